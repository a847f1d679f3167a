"""Run one benchmark: `python benchmarks/run.py <name> [options]`; `--help` lists them."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

BENCHMARKS = sorted(p.stem.removeprefix("bench_") for p in Path(__file__).parent.glob("bench_*.py"))


def parser() -> argparse.ArgumentParser:
    """Every benchmark's command line (rdw_tracking_tests/test_docs.py parses the documented ones)."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True)
    for name in BENCHMARKS:
        module = importlib.import_module(f"bench_{name}")
        # argparse %-formats help strings: "~20%" in a docstring broke `run.py --help`.
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0].replace("%", "%%"))
        p.add_argument("--url", help="database to measure on (default: embedded rdw_bench)")
        p.add_argument("--no-record", action="store_true", help="don't rewrite RESULTS.md")
        module.add_arguments(p)
        p.set_defaults(module=module)
    return parser


def main() -> int:
    args = parser().parse_args()
    args.url_given = args.url
    args.url = harness.database_url(args.url)
    rows = args.module.run(args)
    print(harness.table(rows))
    if not args.no_record:
        harness.record(args.name, args.module.TITLE, rows, getattr(args.module, "NOTES", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
