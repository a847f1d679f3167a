"""Bad input: every config field of every job and of `target_db`, table-driven.

Jobs: verify_execution_tracking, post_collection_validation, create_execution_id_indexes,
add_execution_id_foreign_key, rollback_execution_id, restore_execution_id and
weekly_collection (the sensors take no run config; their resource is tested in
test_sensors.py).

Each case says where it must be refused and what the message must name:

- `launch`: refused before a run exists — a wrong type by Dagster's config schema, a
  bad value by the job's `checked_at_launch` mapping (the Config classes' and
  TargetDatabase's own validators);
- `step`: a well-formed name that names nothing (an unknown schema or table, a name
  carrying SQL) fails one step once, not retried, naming `schema.table` and the field;
- `check`: the run goes on, a check fails naming the table and the field;
- `ok`: the input is fine (a schema that needs quoting) and the job works.

Around every case the database's schema and data checksums must be unchanged (but for
`ok` cases of write jobs). The cases share one database, copied from the template:
nothing may change it, so sharing it only makes the test stricter.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field

import dagster as dg
import psycopg
import pytest

from rdw_tracking_tests.conftest import (
    create_database,
    database_checksums,
    drop_database,
    launch_refusal,
    step_failure_messages,
)

SQL_NAME = 'x"; DROP TABLE report_data_weeks; --'
QUOTED = "Report Data"
TODAY = dt.datetime.now(dt.timezone.utc).date()
FUTURE_DATE = (TODAY + dt.timedelta(days=2)).isoformat()
PAST_DATE = (TODAY - dt.timedelta(days=30)).isoformat()
UNKNOWN_UUID = "00000000-0000-0000-0000-00000000dead"
URL_PASSWORD = "hunter2-in-run-config"

VERIFY = "verify_execution_tracking"
POST = "post_collection_validation"
INDEXES = "create_execution_id_indexes"
FOREIGN_KEY = "add_execution_id_foreign_key"
ROLLBACK = "rollback_execution_id"
RESTORE = "restore_execution_id"
WEEKLY = "weekly_collection"
# A real run where a run has a real mode: if a refusal failed, the checksums would show it.
BASE = {
    VERIFY: {},
    POST: {},
    INDEXES: {},
    FOREIGN_KEY: {},
    ROLLBACK: {
        "ops": {"execution_id_rollback": {"config": {"cutoff_date": PAST_DATE, "dry_run": False}}}
    },
    RESTORE: {"ops": {"execution_id_restore": {"config": {"dry_run": False}}}},
    WEEKLY: {},
}
OP = {
    VERIFY: "execution_id_population",
    POST: "execution_id_population",
    INDEXES: "execution_id_indexes",
    FOREIGN_KEY: "add_foreign_key",
    ROLLBACK: "execution_id_rollback",
    RESTORE: "execution_id_restore",
    WEEKLY: "collect_weeks",
}


@dataclass(frozen=True)
class Case:
    job: str
    config: dict
    outcome: str  # launch | step | check | ok
    expect: tuple[str, ...] = ()  # each appears in the message
    changes: bool = False  # an `ok` case of a write job changes the database
    label: str = field(default="", compare=False)

    @property
    def id(self) -> str:
        return f"{self.job}:{self.label}"


def merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def resource(job: str, outcome: str, expect: tuple[str, ...], **fields) -> Case:
    config = merged(BASE[job], {"resources": {"target_db": {"config": fields}}})
    label = "target_db." + ",".join(f"{k}={v!r}"[:40] for k, v in fields.items())
    return Case(job, config, outcome, expect, label=label)


def op_config(job: str, outcome: str, expect: tuple[str, ...], op: str | None = None, **fields):
    op = op or OP[job]
    config = merged(BASE[job], {"ops": {op: {"config": fields}}})
    label = f"{op}." + ",".join(f"{k}={v!r}"[:40] for k, v in fields.items())
    return Case(job, config, outcome, expect, label=label)


# -- target_db: every job validates it at launch ------------------------------------------

RESOURCE_AT_LAUNCH = [
    ({"url": ""}, "url"),
    ({"url": 5}, "url"),
    ({"url": "postgresql://rdw@db.example:notaport/reporting"}, "url"),
    (
        {"url": f"postgresql://rdw:{URL_PASSWORD}@127.0.0.1:5432/reporting"},
        "url carries a password",
    ),
    ({"schema_name": ""}, "schema_name"),
    ({"schema_name": 7}, "schema_name"),
    ({"schema_name": " public"}, "schema_name"),
    ({"schema_name": "s" * 64}, "schema_name"),
    ({"weeks_table": ""}, "weeks_table"),
    ({"weeks_table": "report_data_weeks\n"}, "weeks_table"),
    ({"executions_table": "   "}, "executions_table"),
    ({"collections_table": ""}, "collections_table"),
    ({"statement_timeout_ms": "5s"}, "statement_timeout_ms"),
    ({"statement_timeout_ms": -1}, "statement_timeout_ms"),
    ({"statement_timeout_ms": 10**12}, "statement_timeout_ms"),
    ({"lock_timeout_ms": 1.5}, "lock_timeout_ms"),
    ({"lock_timeout_ms": -5}, "lock_timeout_ms"),
    ({"lock_timeout_ms": 10**30}, "lock_timeout_ms"),
    ({"idle_in_transaction_timeout_ms": 0}, "idle_in_transaction_timeout_ms"),
    ({"idle_in_transaction_timeout_ms": 10**9}, "idle_in_transaction_timeout_ms"),
    # Unencoded `/` or `@` in the password, another server: refused quoting nothing.
    ({"url": f"postgresql://rdw:{URL_PASSWORD}/x@127.0.0.1:5432/reporting"}, "unencoded"),
    ({"url": "postgresql://rdw@db.example:5432/reporting"}, "another server"),
    ({"schema": "public"}, "schema"),  # a field that does not exist
    ({"fleet_name": 7}, "fleet_name"),
]
# All of them against one job; every job's own launch mapping gets a few.
CASES = [
    resource(VERIFY, "launch", (expected,), **fields) for fields, expected in RESOURCE_AT_LAUNCH
]
CASES += [
    resource(job, "launch", (expected,), **fields)
    for job in BASE
    if job != VERIFY
    for fields, expected in (RESOURCE_AT_LAUNCH[3], RESOURCE_AT_LAUNCH[4], RESOURCE_AT_LAUNCH[13])
]

# -- target_db names that are well-formed but name nothing: the step that reads them fails

CASES += [
    resource(job, "step", ("schema", SQL_NAME, "target_db.schema_name"), schema_name=SQL_NAME)
    for job in BASE
]
CASES += [
    resource(
        VERIFY, "step", ("'no_such_schema'", "target_db.schema_name"), schema_name="no_such_schema"
    ),
    resource(VERIFY, "step", ("public.NoSuchTable", "weeks_table"), weeks_table="NoSuchTable"),
]
CASES += [
    resource(job, "step", (f"public.{SQL_NAME}", "weeks_table"), weeks_table=SQL_NAME)
    for job in BASE
]
CASES += [
    resource(
        VERIFY,
        "step",
        (f"public.{SQL_NAME}", "target_db.executions_table"),
        executions_table=SQL_NAME,
    ),
    resource(
        POST,
        "check",
        (f"public.{SQL_NAME}", "target_db.executions_table"),
        executions_table=SQL_NAME,
    ),
    resource(
        FOREIGN_KEY,
        "step",
        (f"public.{SQL_NAME}", "target_db.executions_table"),
        executions_table=SQL_NAME,
    ),
    Case(
        INDEXES,
        {
            "ops": {
                "execution_id_indexes": {
                    "config": {
                        "indexes": ["idx_report_data_weeks_execution_id"],
                        "workflow_executions_completed_at": True,
                    }
                }
            },
            "resources": {"target_db": {"config": {"executions_table": SQL_NAME}}},
        },
        "step",
        (f"public.{SQL_NAME}", "target_db.executions_table"),
        label="target_db.executions_table (opt-in index)",
    ),
    resource(
        WEEKLY,
        "step",
        (f"public.{SQL_NAME}", "target_db.executions_table"),
        executions_table=SQL_NAME,
    ),
    resource(
        WEEKLY,
        "step",
        (f"public.{SQL_NAME}", "target_db.collections_table"),
        collections_table=SQL_NAME,
    ),
    # Only weekly_collection reads report_data_collections: elsewhere a wrong name harms nothing.
    resource(POST, "ok", (), collections_table=SQL_NAME),
]

# -- names that need quoting and exist: they must work -----------------------------------

CASES += [
    resource(VERIFY, "ok", (), schema_name=QUOTED),
    resource(POST, "ok", (), schema_name=QUOTED),
    Case(
        ROLLBACK,
        {
            "ops": {"execution_id_rollback": {"config": {"cutoff_date": PAST_DATE}}},
            "resources": {"target_db": {"config": {"schema_name": QUOTED}}},
        },
        "ok",
        label="target_db.schema_name='Report Data' (dry run)",
    ),
    Case(
        INDEXES,
        {"resources": {"target_db": {"config": {"schema_name": QUOTED}}}},
        "ok",
        changes=True,
        label="target_db.schema_name='Report Data'",
    ),
]

# -- each job's own config ------------------------------------------------------------------

POPULATION = [
    ({"window_days": "7"}, "window_days"),
    ({"window_days": 0}, "window_days"),
    ({"window_days": -3}, "window_days"),
    ({"window_days": 10**12}, "window_days"),
    ({"tracking_started_at": ""}, "tracking_started_at"),
    ({"tracking_started_at": "yesterday"}, "tracking_started_at"),
    ({"tracking_started_at": "2024-02-30"}, "tracking_started_at"),
    ({"tracking_started_at": FUTURE_DATE}, "tracking_started_at"),
    ({"tracking_started_at": 20240101}, "tracking_started_at"),
    ({"min_recent_population_pct": -1.0}, "min_recent_population_pct"),
    ({"min_recent_population_pct": 1e308}, "min_recent_population_pct"),
    ({"min_recent_population_pct": "high"}, "min_recent_population_pct"),
    ({"trend_margin_pct": 100.5}, "trend_margin_pct"),
    ({"windowdays": 7}, "windowdays"),  # a typo
    ({"execution_ids": ["not-a-uuid"]}, "execution_ids"),
    ({"execution_ids": "6f1c2a9e-0000-0000-0000-000000000000"}, "execution_ids"),
    ({"refresh_days": -1}, "refresh_days"),
    ({"refresh_days": 400}, "refresh_days"),
    ({"count_budget_hours": -1}, "count_budget_hours"),
    ({"count_budget_hours": 10_000}, "count_budget_hours"),
    ({"count_budget_hours": "a day"}, "count_budget_hours"),
]
CASES += [op_config(VERIFY, "launch", (f,), **c) for c, f in POPULATION]
# The same Config class behind another job's launch mapping: a few suffice.
CASES += [
    op_config(POST, "launch", (f,), **POPULATION[i][0])
    for i, f in (
        (1, "window_days"),
        (7, "tracking_started_at"),
        (9, "min_recent_population_pct"),
        (12, "trend_margin_pct"),
        (14, "execution_ids"),
        (16, "refresh_days"),
        (18, "count_budget_hours"),
    )
]
CASES += [
    op_config(VERIFY, "launch", ("collection_id",), op="execution_id_join_plan", **c)
    for c in (
        {"collection_id": ""},
        {"collection_id": "busiest"},
        {"collection_id": 5},
        {"collection_id": "x'; DROP TABLE report_data_weeks; --"},
    )
]
CASES += [
    op_config(VERIFY, "ok", (), op="execution_id_join_plan", collection_id=UNKNOWN_UUID),
]
CASES += [
    op_config(VERIFY, "launch", (f,), op="execution_id_storage", **c)
    for c, f in (
        ({"sample_above_bytes": -1}, "sample_above_bytes"),
        ({"sample_above_bytes": 10**30}, "sample_above_bytes"),
        ({"sample_above_bytes": "1GB"}, "sample_above_bytes"),
        ({"sample_bytes": 0}, "sample_bytes"),
        ({"sample_bytes": 2**63}, "sample_bytes"),
    )
]
CASES += [
    op_config(INDEXES, "launch", (f,), **c)
    for c, f in (
        ({"indexes": "idx_report_data_weeks_execution_id"}, "indexes"),
        ({"indexes": [""]}, "indexes"),
        ({"indexes": [SQL_NAME]}, "indexes"),
        ({"indexes": []}, "indexes"),
        ({"workflow_executions_completed_at": "yes"}, "workflow_executions_completed_at"),
        ({"report_data_weeks_created_at": "maybe"}, "report_data_weeks_created_at"),
        ({"lock_retries": -1}, "lock_retries"),
        ({"lock_retries": 10**12}, "lock_retries"),
        ({"retry_backoff_s": -0.5}, "retry_backoff_s"),
        ({"retry_backoff_s": 1e9}, "retry_backoff_s"),
        ({"progress_every_s": 0}, "progress_every_s"),
        ({"progress_every_s": "often"}, "progress_every_s"),
    )
]
CASES += [
    op_config(FOREIGN_KEY, "launch", (f,), **c)
    for c, f in (
        ({"on_delete": ""}, "on_delete"),
        ({"on_delete": "DROP"}, "on_delete"),
        ({"on_delete": "CASCADE; DROP TABLE report_data_weeks; --"}, "on_delete"),
        ({"on_delete": 5}, "on_delete"),
        ({"lock_retries": -1}, "lock_retries"),
        ({"lock_retries": 100}, "lock_retries"),
        ({"retry_backoff_s": -1.0}, "retry_backoff_s"),
    )
]
BACKUP_NAMES = [
    ({"backup_schema": ""}, "backup_schema"),
    ({"backup_schema": "s" * 64}, "backup_schema"),
    ({"backup_table": ""}, "backup_table"),
    ({"backup_table": SQL_NAME}, "backup_table"),
    ({"state_table": "Rollback Runs"}, "state_table"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": -5}, "batch_size"),
    ({"batch_size": 10**12}, "batch_size"),
    ({"batch_size": "many"}, "batch_size"),
    ({"dry_run": "false"}, "dry_run"),
    ({"visible_rows_only": "yes"}, "visible_rows_only"),
    ({"max_replica_lag_s": -1}, "max_replica_lag_s"),
    ({"max_replica_lag_s": 10**9}, "max_replica_lag_s"),
    ({"max_replica_lag_s": "ten"}, "max_replica_lag_s"),
]
CASES += [op_config(ROLLBACK, "launch", (f,), **c) for c, f in BACKUP_NAMES]
CASES += [
    op_config(RESTORE, "launch", (BACKUP_NAMES[i][1],), **BACKUP_NAMES[i][0])
    for i in (0, 2, 4, 6, 9, 10, 11)
]
CASES += [
    op_config(ROLLBACK, "launch", (f,), **c)
    for c, f in (
        ({"cutoff_date": ""}, "cutoff_date"),
        ({"cutoff_date": "2024-02-30"}, "cutoff_date"),
        ({"cutoff_date": "01/02/2024"}, "cutoff_date"),
        ({"cutoff_date": FUTURE_DATE}, "cutoff_date"),
        ({"cutoff_date": 20240101}, "cutoff_date"),
        ({"expected_rows": -1}, "expected_rows"),
        ({"expected_rows": 10**30}, "expected_rows"),
        ({"expected_rows": "all"}, "expected_rows"),
        ({"lock_timeout_ms": 0}, "lock_timeout_ms"),
        ({"lock_timeout_ms": 10**9}, "lock_timeout_ms"),
    )
]
CASES += [
    Case(
        ROLLBACK,
        {"ops": {"execution_id_rollback": {"config": {"dry_run": False}}}},
        "launch",
        ("cutoff_date",),
        label="cutoff_date missing",
    ),
    op_config(ROLLBACK, "step", (f"schema {SQL_NAME}", "backup_schema"), backup_schema=SQL_NAME),
    op_config(
        ROLLBACK, "step", ("schema no_such_schema", "backup_schema"), backup_schema="no_such_schema"
    ),
]
CASES += [
    op_config(RESTORE, "launch", ("rollback_id",), **c)
    for c in (
        {"rollback_id": ""},
        {"rollback_id": "latest"},
        {"rollback_id": 5},
        {"rollback_id": f"{UNKNOWN_UUID}'; DROP TABLE report_data_weeks; --"},
    )
]
CASES += [
    op_config(
        RESTORE,
        "step",
        ("public.execution_id_rollback_backup", "backup_schema"),
        rollback_id=UNKNOWN_UUID,
    ),
    op_config(RESTORE, "step", (f"schema {SQL_NAME}", "backup_schema"), backup_schema=SQL_NAME),
]


CASES += [
    op_config(WEEKLY, "launch", ("collections",), **c)
    for c in (
        {"collections": 0},
        {"collections": -1},
        {"collections": 10**12},
        {"collections": "all"},
    )
]


# -- the test ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_url(admin_url, template_name):
    """One database for every case: the demo data, plus a copy in schema "Report Data"."""
    from rdw_tracking import demo

    name = f"rdw_test_{os.getpid()}_bad_input"
    url = create_database(admin_url, name, template=template_name)
    demo.build(url, demo.DemoShape(rows=104), demo.DemoNames(schema=QUOTED))
    yield url
    drop_database(admin_url, name)


def test_case_table_covers_every_config_field():
    """Every field of every job's config, and of target_db, has at least one case."""
    from rdw_tracking.definitions import defs
    from rdw_tracking.resources import TargetDatabase

    covered = {
        (case.job, op, name)
        for case in CASES
        for op, body in case.config.get("ops", {}).items()
        for name in body.get("config", {})
    }
    resource_covered = {
        name
        for case in CASES
        for name in case.config.get("resources", {}).get("target_db", {}).get("config", {})
    }
    assert set(TargetDatabase.model_fields) <= resource_covered
    for job_name in BASE:
        job = defs.resolve_job_def(job_name)
        for node in job.graph.node_defs:
            schema = node.config_schema
            if schema is None or not getattr(schema.config_type, "fields", None):
                continue
            for name in schema.config_type.fields:
                assert (job_name, node.name, name) in covered, (
                    f"no case for {job_name} {node.name}.{name}"
                )


@pytest.fixture(scope="module")
def shared_state(shared_url):
    """The Dagster instance the cases run on, and the database's checksums as the last
    case left them: the next case's "before" (one checksum per case, not two)."""
    with psycopg.connect(shared_url, autocommit=True) as conn:
        yield {
            "instance": dg.DagsterInstance.ephemeral(),
            "conn": conn,
            "checksums": database_checksums(conn),
        }


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_is_refused_and_changes_nothing(
    case, shared_url, shared_state, run_job, monkeypatch
):
    monkeypatch.setenv("RDW_DATABASE_URL", shared_url)
    instance = shared_state["instance"]
    before = shared_state["checksums"]
    runs_before = instance.get_runs_count()
    if case.outcome == "launch":
        message = launch_refusal(run_job, case.job, case.config, instance=instance)
        assert instance.get_runs_count() == runs_before, "a refused launch created a run"
    else:
        result = run_job(case.job, case.config, instance=instance)
        retried = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
        assert not retried, f"a refusal was retried: {[e.message for e in retried]}"
        failures = step_failure_messages(result)
        if case.outcome == "step":
            assert not result.success and failures
            # Every step that reads the field fails the same way (verify has several).
            message = "\n".join(failures)
            assert "psycopg" not in message and "Traceback" not in message, message
        else:
            assert result.success, failures
            failed = [
                e.description
                for e in result.get_asset_check_evaluations()
                if not e.passed and e.severity == dg.AssetCheckSeverity.ERROR
            ]
            message = "\n".join(failed)
            if case.outcome == "check":
                assert failed
    for expected in case.expect:
        assert expected in message, f"{expected!r} not in {message!r}"
    assert URL_PASSWORD not in message
    after = database_checksums(shared_state["conn"])
    shared_state["checksums"] = after
    if not case.changes:
        assert after == before, "the database changed"
