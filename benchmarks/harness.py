"""The benchmark harness: a database to measure on, a table printer, RESULTS.md.

Each benchmark is a module `bench_<name>.py` with `add_arguments(parser)` and
`run(args) -> list[dict]`; `python benchmarks/run.py <name> ...` runs it, prints its
rows as a table and replaces its section of RESULTS.md with them.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
from contextlib import contextmanager
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
BENCH_DATABASE = "rdw_bench"


def is_embedded(url: str | None) -> bool:
    """Whether the benchmark runs on the embedded server (no `--url`, no RDW_DATABASE_URL)."""
    return not (url or os.environ.get("RDW_DATABASE_URL"))


def database_url(url: str | None) -> str:
    """`url`, else RDW_DATABASE_URL, else the `rdw_bench` database on the embedded server."""
    if not is_embedded(url):
        return url or os.environ["RDW_DATABASE_URL"]
    from rdw_tracking import embedded

    embedded.start()
    return embedded.database_url(BENCH_DATABASE)


def settle(url: str) -> None:
    """Start measuring from a quiet disk: a demo build leaves gigabytes of dirty pages in
    PostgreSQL and the OS cache, and their write-back stalls whatever runs next."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    os.sync()


@contextmanager
def server_setting(name: str, value: str | None):
    """The embedded server restarted with `name` set to `value` (None: its default) for
    the block, then restarted with its default again. The setting's value is yielded."""
    import psycopg
    from psycopg import sql

    from rdw_tracking import embedded

    admin = embedded.database_url("postgres")

    def apply(value: str | None) -> str:
        with psycopg.connect(admin, autocommit=True) as conn:
            if value is None:
                conn.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
            else:
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), value)
                )
        embedded.stop()
        embedded.start()
        with psycopg.connect(admin) as conn:
            return conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]

    try:
        yield apply(value)
    finally:
        if value is not None:
            apply(None)


def table(rows: list[dict]) -> str:
    """A Markdown table of `rows` (their keys are the columns)."""
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]

    def line(values):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    return "\n".join(
        [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)]
    )


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def record(name: str, title: str, rows: list[dict], notes: str = "") -> None:
    """Replace the section of benchmark `name` in RESULTS.md with these rows."""
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Benchmark results\n\nLatest figures of `python benchmarks/run.py <name>`; each section is rewritten by its benchmark.\n"
    )
    stamp = f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, Python {platform.python_version()}"
    section = (
        f"<!-- {name} -->\n## {title}\n\n`python benchmarks/run.py {name}` — {stamp}\n\n"
        f"{table(rows)}\n{(chr(10) + notes + chr(10)) if notes else ''}<!-- /{name} -->"
    )
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = (
        pattern.sub(lambda _: section, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section + "\n"
    )
    RESULTS.write_text(text)
