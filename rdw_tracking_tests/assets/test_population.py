"""The population snapshot and its checks, every figure against the spec's own SQL."""

import datetime as dt

import dagster as dg
import pandas as pd
import pytest

from rdw_tracking.assets.population import RATE_CHECK
from rdw_tracking_tests.conftest import check_results, launch_refusal, materialization_metadata

ASSET = "execution_id_population"
ERROR, WARN = dg.AssetCheckSeverity.ERROR, dg.AssetCheckSeverity.WARN
CREATED_AT_INDEX = (
    "CREATE INDEX idx_report_data_weeks_created_at ON report_data_weeks (created_at, execution_id)"
)


@pytest.fixture(autouse=True, params=["one-pass", "tally"])
def counting(request, database_url, sql_exec) -> str:
    """Every figure holds both ways: one pass over the table (no index on created_at), and
    from the per-day tally (with the opt-in idx_report_data_weeks_created_at)."""
    if request.param == "tally":
        sql_exec(CREATED_AT_INDEX)
    return request.param


def snapshot(run_job, **config):
    result = run_job(
        "post_collection_validation",
        run_config={"ops": {ASSET: {"config": config}}} if config else None,
    )
    assert result.success, failure_text(result)
    return result, materialization_metadata(result, ASSET), check_results(result)


def failure_text(result) -> str:
    """Messages of every step failure, with their causes (config errors live there)."""
    texts = []
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            error = event.event_specific_data.error
            while error is not None:
                texts.append(error.message)
                error = error.cause
    return "\n".join(texts)


def spec_counts(sql_exec, where: str = "true", params=None) -> tuple:
    """The spec's population query: count, count(execution_id), ROUND(... * 100.0 / count, 2)."""
    return sql_exec(
        "SELECT count(*), count(execution_id), "
        "ROUND(count(execution_id) * 100.0 / NULLIF(count(*), 0), 2) "
        f"FROM report_data_weeks WHERE {where}",
        params,
    )[0]


def spec_daily(sql_exec, window_days: int = 7) -> list[dict]:
    """The spec's per-day breakdown, with the days that have no rows filled in."""
    rows = sql_exec(
        "SELECT DATE(created_at), count(*), count(execution_id), "
        "ROUND(count(execution_id) * 100.0 / count(*), 2) FROM report_data_weeks "
        "WHERE created_at >= CURRENT_DATE - %s::int GROUP BY 1 ORDER BY 1",
        [window_days],
    )
    today = sql_exec("SELECT CURRENT_DATE")[0][0]
    found = {r[0]: r for r in rows}
    days = sorted(
        {today - dt.timedelta(days=k) for k in range(window_days + 1)} | set(found),
    )
    return [
        {
            "creation_date": day.isoformat(),
            "total_records": found[day][1] if day in found else 0,
            "with_execution_id": found[day][2] if day in found else 0,
            "population_rate": float(found[day][3]) if day in found else None,
        }
        for day in days
    ]


def daily_records(meta) -> list[dict]:
    return [record.data for record in meta["daily"].records]


def as_float(value):
    return None if value is None else float(value)


def assert_matches_spec(sql_exec, meta, window_days=7):
    total, with_id, pct = spec_counts(sql_exec)
    assert (meta["total_rows"], meta["with_execution_id"]) == (total, with_id)
    assert meta["without_execution_id"] == total - with_id
    assert meta["population_pct"] == as_float(pct)
    total, with_id, pct = spec_counts(
        sql_exec, "created_at >= CURRENT_DATE - %s::int", [window_days]
    )
    assert (meta["recent_total_rows"], meta["recent_with_execution_id"]) == (total, with_id)
    assert meta["recent_population_pct"] == as_float(pct)
    assert meta["window_days"] == window_days
    assert daily_records(meta) == spec_daily(sql_exec, window_days)


def test_demo_figures_match_the_spec_queries(db, sql_exec, run_job):
    result, meta, checks = snapshot(run_job)
    assert_matches_spec(sql_exec, meta)
    assert 0 < meta["population_pct"] < 100  # legacy rows without, recent rows with an id
    assert len(meta["daily"].records) == 8  # CURRENT_DATE - 7 .. today
    for key in ("total_rows", "with_execution_id", "recent_total_rows", "window_days"):
        assert type(meta[key]) is int, key
    assert type(meta["population_pct"]) is float
    # The spec's "sample current data state": the five latest rows.
    latest = sql_exec("SELECT id::text FROM report_data_weeks ORDER BY created_at DESC LIMIT 5")
    assert [r.data["id"] for r in meta["sample"].records] == [r[0] for r in latest]
    # The returned DataFrame is the daily table.
    frame = result.output_for_node(ASSET)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == [
        "creation_date",
        "total_records",
        "with_execution_id",
        "population_rate",
    ]
    assert frame["total_records"].tolist() == [d["total_records"] for d in spec_daily(sql_exec)]
    assert checks[RATE_CHECK].passed and checks[RATE_CHECK].severity == ERROR
    # The demo data carries a few orphaned ids: the check finds exactly those.
    orphans = sql_exec(
        "SELECT count(*) FROM report_data_weeks w WHERE execution_id IS NOT NULL AND NOT EXISTS"
        " (SELECT 1 FROM workflow_executions e WHERE e.id = w.execution_id)"
    )[0][0]
    exist = checks["execution_ids_exist"]
    assert not exist.passed and exist.severity == ERROR
    assert exist.metadata["orphan_count"].value == orphans > 0
    trend = checks["execution_id_population_trend"]
    assert trend.passed and trend.severity == WARN


def test_longer_window(db, sql_exec, run_job):
    _, meta, _ = snapshot(run_job, window_days=60)
    assert_matches_spec(sql_exec, meta, window_days=60)
    assert len(meta["daily"].records) == 61
    assert meta["recent_population_pct"] < 100  # the window reaches back before the cut-over


def test_empty_table(db, sql_exec, run_job):
    sql_exec("TRUNCATE report_data_weeks")
    _, meta, checks = snapshot(run_job)
    assert meta["total_rows"] == 0 and meta["population_pct"] is None
    assert meta["recent_total_rows"] == 0 and meta["recent_population_pct"] is None
    assert [d["total_records"] for d in daily_records(meta)] == [0] * 8
    assert meta["sample"].records == []
    rate = checks[RATE_CHECK]
    assert not rate.passed and rate.severity == WARN
    assert "nothing to judge" in rate.description
    assert checks["execution_ids_exist"].passed
    assert checks["execution_id_population_trend"].passed


def test_all_null(db, sql_exec, run_job):
    sql_exec("UPDATE report_data_weeks SET execution_id = NULL")
    _, meta, checks = snapshot(run_job)
    assert_matches_spec(sql_exec, meta)
    assert meta["population_pct"] == 0.0 and meta["recent_population_pct"] == 0.0
    rate = checks[RATE_CHECK]
    assert not rate.passed and rate.severity == ERROR
    assert "below the 99.0% threshold" in rate.description
    assert checks["execution_ids_exist"].passed  # NULLs are not orphans


def clear_template_orphans(sql_exec) -> None:
    """Point the demo data's few orphaned ids at a real execution: a clean slate."""
    sql_exec(
        "UPDATE report_data_weeks w SET execution_id = "
        "(SELECT id FROM workflow_executions ORDER BY id LIMIT 1) WHERE execution_id IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM workflow_executions e WHERE e.id = w.execution_id)"
    )


def test_all_populated(db, sql_exec, run_job):
    clear_template_orphans(sql_exec)
    sql_exec(
        "UPDATE report_data_weeks SET execution_id = "
        "(SELECT id FROM workflow_executions ORDER BY id LIMIT 1) WHERE execution_id IS NULL"
    )
    _, meta, checks = snapshot(run_job)
    assert_matches_spec(sql_exec, meta)
    assert meta["population_pct"] == 100.0 and meta["without_execution_id"] == 0
    assert all(check.passed for check in checks.values())


def test_rows_only_outside_the_window(db, sql_exec, run_job):
    sql_exec("DELETE FROM report_data_weeks WHERE created_at >= CURRENT_DATE - 7")
    _, meta, checks = snapshot(run_job)
    assert_matches_spec(sql_exec, meta)
    assert meta["total_rows"] > 0 and meta["recent_total_rows"] == 0
    assert all(d["total_records"] == 0 for d in daily_records(meta))
    rate = checks[RATE_CHECK]
    assert not rate.passed and rate.severity == WARN


def test_days_without_rows_are_listed(db, sql_exec, run_job):
    sql_exec(
        "DELETE FROM report_data_weeks WHERE created_at::date IN (CURRENT_DATE - 3, CURRENT_DATE - 5)"
    )
    _, meta, _ = snapshot(run_job)
    assert_matches_spec(sql_exec, meta)
    today = sql_exec("SELECT CURRENT_DATE")[0][0]
    by_day = {d["creation_date"]: d for d in daily_records(meta)}
    for k in (3, 5):
        day = by_day[(today - dt.timedelta(days=k)).isoformat()]
        assert day["total_records"] == 0 and day["population_rate"] is None


def test_future_rows_count_under_their_own_date(db, sql_exec, run_job):
    sql_exec(
        "UPDATE report_data_weeks SET created_at = CURRENT_DATE + 3 + interval '1 hour' "
        "WHERE id IN (SELECT id FROM report_data_weeks ORDER BY id LIMIT 4)"
    )
    _, meta, _ = snapshot(run_job)
    assert_matches_spec(sql_exec, meta)
    assert daily_records(meta)[-1]["total_records"] == 4


def test_orphans_older_than_a_day(db, sql_exec, run_job):
    clear_template_orphans(sql_exec)
    old = sql_exec(
        "UPDATE report_data_weeks SET execution_id = gen_random_uuid() WHERE id IN "
        "(SELECT id FROM report_data_weeks WHERE created_at < CURRENT_DATE - 2 "
        " ORDER BY id LIMIT 3) RETURNING id::text, execution_id::text"
    )
    _, _, checks = snapshot(run_job)
    orphans = checks["execution_ids_exist"]
    assert not orphans.passed and orphans.severity == ERROR
    assert orphans.metadata["orphan_count"].value == 3
    assert orphans.metadata["recent_orphan_count"].value == 0
    sample = {
        (r.data["id"], r.data["execution_id"])
        for r in orphans.metadata["orphan_sample"].value.records
    }
    assert sample == {tuple(row) for row in old}
    assert "3 rows of public.report_data_weeks.execution_id" in orphans.description


def test_orphans_counted_like_the_spec(db, sql_exec, run_job):
    clear_template_orphans(sql_exec)
    sql_exec(
        "UPDATE report_data_weeks SET execution_id = gen_random_uuid() WHERE id IN "
        "(SELECT id FROM report_data_weeks ORDER BY created_at DESC LIMIT 12)"
    )
    sql_exec(
        "UPDATE report_data_weeks SET execution_id = gen_random_uuid() WHERE id IN "
        "(SELECT id FROM report_data_weeks ORDER BY created_at LIMIT 5)"
    )
    _, _, checks = snapshot(run_job)
    metadata = checks["execution_ids_exist"].metadata
    spec = (
        "SELECT count(*) FROM report_data_weeks rdw LEFT JOIN workflow_executions we "
        "ON rdw.execution_id = we.id WHERE rdw.execution_id IS NOT NULL AND we.id IS NULL"
    )
    assert metadata["orphan_count"].value == sql_exec(spec)[0][0] == 17
    recent = sql_exec(spec + " AND rdw.created_at >= CURRENT_DATE - 1")[0][0]
    assert metadata["recent_orphan_count"].value == recent > 0
    assert len(metadata["orphan_sample"].value.records) == 10


def test_missing_workflow_executions_fails_the_orphan_check(db, sql_exec, run_job):
    sql_exec("DROP TABLE workflow_executions")
    _, meta, checks = snapshot(run_job)
    assert meta["total_rows"] == 2600
    orphans = checks["execution_ids_exist"]
    assert not orphans.passed and orphans.severity == ERROR
    assert "table public.workflow_executions does not exist" in orphans.description


def test_tracking_started_at_leaves_legacy_rows_out(db, sql_exec, run_job):
    started = sql_exec("SELECT (CURRENT_DATE - 3 + interval '12 hours')::timestamptz")[0][0]
    # Rows of the window created before the deploy are legacy rows: no execution_id.
    sql_exec(
        "UPDATE report_data_weeks SET execution_id = NULL "
        "WHERE created_at >= CURRENT_DATE - 7 AND created_at < %s",
        [started],
    )
    _, meta, checks = snapshot(run_job)
    assert not checks[RATE_CHECK].passed

    _, meta, checks = snapshot(run_job, tracking_started_at=started.isoformat())
    total, with_id, pct = spec_counts(sql_exec, "created_at >= %s", [started])
    assert (meta["recent_total_rows"], meta["recent_with_execution_id"]) == (total, with_id)
    assert meta["recent_population_pct"] == float(pct) == 100.0
    assert meta["recent_since"] == started.isoformat()
    assert (meta["since_tracking_total_rows"], meta["since_tracking_population_pct"]) == (
        total,
        100.0,
    )
    assert daily_records(meta) == spec_daily(sql_exec)  # the daily table stays the spec's
    assert checks[RATE_CHECK].passed, checks[RATE_CHECK].description
    # Days that began before the deploy are no baseline for the trend.
    assert checks["execution_id_population_trend"].passed


def test_tracking_started_long_ago_keeps_the_window(db, sql_exec, run_job):
    _, meta, _ = snapshot(run_job, tracking_started_at="2000-01-01")
    assert_matches_spec(sql_exec, meta)
    assert meta["since_tracking_total_rows"] == 2600


def test_threshold_is_configurable(db, sql_exec, run_job):
    sql_exec(
        "UPDATE report_data_weeks SET execution_id = NULL WHERE id = "
        "(SELECT id FROM report_data_weeks WHERE created_at >= CURRENT_DATE - 7 LIMIT 1)"
    )
    _, meta, checks = snapshot(run_job)
    assert 90 < meta["recent_population_pct"] < 99
    assert not checks[RATE_CHECK].passed
    _, _, checks = snapshot(run_job, min_recent_population_pct=90.0)
    assert checks[RATE_CHECK].passed


def test_trend_warns_on_a_drop(db, sql_exec, run_job):
    sql_exec(
        "UPDATE report_data_weeks SET execution_id = NULL WHERE id IN (SELECT id FROM "
        "report_data_weeks WHERE created_at::date = CURRENT_DATE - 1 ORDER BY id LIMIT 3)"
    )
    _, meta, checks = snapshot(run_job)
    trend = checks["execution_id_population_trend"]
    assert not trend.passed and trend.severity == WARN
    yesterday = daily_records(meta)[-2]
    assert trend.metadata["latest_date"].value == yesterday["creation_date"]
    assert trend.metadata["latest_rate"].value == yesterday["population_rate"] < 100
    assert trend.metadata["trailing_rate"].value == 100.0
    assert "stopped stamping execution_id" in trend.description
    # A wide enough margin lets the same drop pass.
    _, _, checks = snapshot(run_job, trend_margin_pct=100.0)
    assert checks["execution_id_population_trend"].passed


@pytest.mark.parametrize(
    "config,field",
    [
        ({"window_days": 0}, "window_days"),
        ({"window_days": 367}, "window_days"),
        ({"min_recent_population_pct": 100.5}, "min_recent_population_pct"),
        ({"trend_margin_pct": -1.0}, "trend_margin_pct"),
        ({"tracking_started_at": "last tuesday"}, "tracking_started_at"),
    ],
)
def test_bad_config_is_refused_naming_the_field(db, run_job, config, field):
    message = launch_refusal(
        run_job, "post_collection_validation", {"ops": {ASSET: {"config": config}}}
    )
    assert field in message


def test_daily_frame_is_stored_for_notebooks(db, tmp_path):
    from rdw_tracking.definitions import defs

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = defs.resolve_job_def("post_collection_validation").execute_in_process(
            instance=instance
        )
        assert result.success
        frame = defs.load_asset_value(ASSET, instance=instance)
    assert isinstance(frame, pd.DataFrame) and len(frame) == 8
    assert frame.equals(result.output_for_node(ASSET))


def test_jobs_select_the_population_and_its_checks():
    from rdw_tracking.definitions import defs

    job = defs.resolve_job_def("post_collection_validation")
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == {ASSET}
    assert {k.name for k in job.asset_layer.asset_graph.asset_check_keys} >= {
        RATE_CHECK,
        "execution_ids_exist",
        "execution_id_population_trend",
    }


@pytest.mark.parametrize(
    ("blocks", "candidates", "window_days"),
    [(0, 10**9, 7), ("half", 10**9, 7), ("half", 10**9, 90), ("half", 0, 7)],
    ids=["no-tail", "rows-found-by-the-pass", "found-by-the-grouped-pass", "whole-table"],
)
def test_latest_rows_sample_is_exact_when_they_are_not_in_the_tail(
    db, sql_exec, run_job, monkeypatch, blocks, candidates, window_days, counting
):
    """The tail shortcut falls back whenever it could be wrong: to the rows at or after
    its floor that the pass found (PostgreSQL 16 and later, when the planner expects few),
    else to the whole table."""
    from rdw_tracking.population import samples as population

    if blocks == "half":  # a tail that holds rows whatever the build left empty at the end
        blocks = sql_exec("SELECT pg_relation_size('report_data_weeks') / 8192 / 2")[0][0]
    monkeypatch.setattr(population, "TAIL_BLOCKS", blocks)
    monkeypatch.setattr(population, "SAMPLE_CANDIDATES_MAX", candidates)
    by_ctid = []
    fetch_rows = population.fetch_rows
    monkeypatch.setattr(
        population,
        "fetch_rows",
        lambda cur, statement, params: (
            by_ctid.append("ctids" in params) or fetch_rows(cur, statement, params)
        ),
    )
    # Make room in the first block, then make one of its rows the latest: the new
    # version stays in that block (a HOT update), far from the tail.
    sql_exec("DELETE FROM report_data_weeks WHERE ctid < '(1,0)' AND ctid > '(0,1)'")
    sql_exec("VACUUM report_data_weeks")
    sql_exec(
        "UPDATE report_data_weeks SET created_at = now() - interval '1 minute' WHERE ctid = '(0,1)'"
    )
    assert sql_exec(
        "SELECT ctid < '(1,0)' FROM report_data_weeks ORDER BY created_at DESC LIMIT 1"
    )[0][0]
    _, meta, _ = snapshot(run_job, window_days=window_days)
    latest = sql_exec("SELECT id::text FROM report_data_weeks ORDER BY created_at DESC LIMIT 5")
    assert [r.data["id"] for r in meta["sample"].records] == [r[0] for r in latest]
    pass_finds_them = (
        candidates > 0 and blocks > 0 and int(sql_exec("SHOW server_version_num")[0][0]) >= 160000
    )
    # The tally reads the latest rows through the created_at index: no shortcut to fall from.
    assert by_ctid == [pass_finds_them and counting == "one-pass"]
