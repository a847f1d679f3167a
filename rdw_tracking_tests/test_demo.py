"""The demo data builder: counts match what independent SQL says they should be; and
`rdw-tracking demo --fleet` end to end."""

import os
import subprocess
import sys

import pytest
import yaml

from rdw_tracking import demo


def test_demo_counts_match_independent_sql(empty_database_url, sql_exec):
    shape = demo.DemoShape(rows=5_200, cutover_days=56, orphan_every=300)
    summary = demo.build(empty_database_url, shape)

    assert summary["rows"] == 5_200
    assert summary["collections"] == 100
    assert sql_exec("SELECT count(*) FROM report_data_weeks")[0][0] == 5_200
    assert sql_exec("SELECT count(DISTINCT collection_id) FROM report_data_weeks")[0][0] == 100
    assert sql_exec("SELECT count(*) FROM report_data_collections")[0][0] == 100
    # Each collection has one row per week, over a year.
    per_collection = sql_exec(
        "SELECT min(n), max(n) FROM (SELECT count(*) n FROM report_data_weeks GROUP BY collection_id) s"
    )[0]
    assert per_collection == (52, 52)
    # Legacy rows (before the cut-over) carry no execution_id; tracked rows all do.
    legacy_with_id, tracked_without_id = sql_exec(
        "SELECT count(*) FILTER (WHERE created_at < now() - interval '56 days' AND execution_id IS NOT NULL),"
        "       count(*) FILTER (WHERE created_at >= now() - interval '56 days' AND execution_id IS NULL)"
        " FROM report_data_weeks"
    )[0]
    assert (legacy_with_id, tracked_without_id) == (0, 0)
    with_id = sql_exec("SELECT count(execution_id) FROM report_data_weeks")[0][0]
    assert summary["with_execution_id"] == with_id
    assert 0 < with_id < 5_200
    # A few orphaned ids, and every other id names a real execution.
    orphans = sql_exec(
        "SELECT count(*) FROM report_data_weeks w WHERE execution_id IS NOT NULL AND NOT EXISTS"
        " (SELECT 1 FROM workflow_executions e WHERE e.id = w.execution_id)"
    )[0][0]
    assert 1 <= orphans <= with_id // 100 + 2
    # Payloads are real JSON documents of a realistic size.
    avg_bytes = sql_exec("SELECT avg(pg_column_size(data)) FROM report_data_weeks")[0][0]
    assert 150 < avg_bytes < 2_000
    assert sql_exec("SELECT max(created_at) <= now() FROM report_data_weeks")[0][0] is True


def test_demo_tables_match_the_contract(empty_database_url, sql_exec):
    demo.build(empty_database_url, demo.DemoShape(rows=104))
    constraints = dict(
        sql_exec(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = 'report_data_weeks'::regclass"
        )
    )
    assert constraints["fk_collection_id"] == (
        "FOREIGN KEY (collection_id) REFERENCES report_data_collections(id) ON DELETE CASCADE"
    )
    assert constraints["report_data_weeks_pkey"] == "PRIMARY KEY (id)"
    columns = sql_exec(
        "SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name = 'report_data_weeks' ORDER BY ordinal_position"
    )
    assert [c[0] for c in columns] == [
        "id",
        "collection_id",
        "week_start_date",
        "week_end_date",
        "status",
        "execution_id",
        "data",
        "created_at",
        "updated_at",
        "error_message",
    ]
    assert ("execution_id", "uuid", "YES", None) in columns


def test_rebuild_is_repeatable(empty_database_url, sql_exec):
    first = demo.build(empty_database_url, demo.DemoShape(rows=520))
    ids = sql_exec("SELECT md5(string_agg(id::text, ',' ORDER BY id)) FROM report_data_weeks")
    second = demo.build(empty_database_url, demo.DemoShape(rows=520))
    assert {k: v for k, v in first.items() if k != "seconds"} == {
        k: v for k, v in second.items() if k != "seconds"
    }
    assert (
        sql_exec("SELECT md5(string_agg(id::text, ',' ORDER BY id)) FROM report_data_weeks") == ids
    )


@pytest.mark.timeout(900)
def test_demo_fleet_walks_each_of_three_embedded_databases(tmp_path):
    """`rdw-tracking demo --fleet 3` from a clean state dir: its own embedded server,
    three databases (one in another schema, one range-partitioned), every run of each
    succeeding, and a fleet file that holds no URL."""
    home = tmp_path / "rdw"
    # Nothing of this shell's deployment or test settings reaches the demo.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RDW_", "DAGSTER_"))}
    env["RDW_HOME"] = str(home)
    command = [sys.executable, "-m", "rdw_tracking.cli"]
    try:
        proc = subprocess.run(
            [*command, "demo", "--fleet", "3", "--rows", "1040"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=840,
        )
    finally:
        subprocess.run([*command, "db", "stop"], env=env, cwd=tmp_path, capture_output=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = proc.stdout.split("\nsummary\n")[1].splitlines()
    for name, table, layout in [
        ("rdw_fleet_1", "public.report_data_weeks", "ordinary"),
        ("rdw_fleet_2", "reporting.report_weeks", "ordinary"),
        ("rdw_fleet_3", "public.report_data_weeks", "range"),
    ]:
        [line] = [line for line in summary if line.split()[:1] == [name]]
        assert line.split()[1:3] == [table, layout], line
        # indexes, verify, collection, and a validation from each sensor
        assert "runs 5/5 succeeded" in line and "sensor requests 2" in line, line
    assert "3 run request(s), one per database" in proc.stdout
    fleet_file = yaml.safe_load((home / "fleet.yaml").read_text())
    assert [entry["name"] for entry in fleet_file["databases"]] == [
        "rdw_fleet_1",
        "rdw_fleet_2",
        "rdw_fleet_3",
    ]
    assert "://" not in (home / "fleet.yaml").read_text()


HISTORY_OF_THE_DEMO = """
from rdw_tracking import walkthrough
day = walkthrough.start_history_at_demo_data()  # what `make demo` and `make ui` do
from rdw_tracking.definitions import defs
keys = defs.resolve_assets_def("execution_id_daily_population").partitions_def.get_partition_keys()
print(day, keys[0], keys[-1], len(keys))
"""


def test_demo_history_starts_where_its_data_starts(database_url, sql_exec, monkeypatch):
    """Issue 26.4: the daily history's partitions begin on the demo data's first day (the
    demo's backfill covers first day to today), so the UI shows no day before it as
    Missing. In a fresh process: the partitions are fixed when the definitions load."""
    monkeypatch.delenv("RDW_HISTORY_START", raising=False)
    proc = subprocess.run(
        [sys.executable, "-c", HISTORY_OF_THE_DEMO],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    day, first, last, count = proc.stdout.split()
    data_first, today = sql_exec(
        "SELECT min(created_at)::date, CURRENT_DATE FROM report_data_weeks"
    )[0]
    assert day == first == data_first.isoformat()
    assert last == today.isoformat()
    assert int(count) == (today - data_first).days + 1


def test_demo_history_start_refuses_once_the_definitions_are_loaded(database_url):
    from rdw_tracking import walkthrough
    from rdw_tracking.definitions import defs  # noqa: F401  (fixes the partitions)

    with pytest.raises(RuntimeError, match="imported already"):
        walkthrough.start_history_at_demo_data()
