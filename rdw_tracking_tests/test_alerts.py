"""Alerts reach a webhook: a failed run, and a failed check in a green run.

The jobs run in process against a persistent test instance; the sensors are evaluated
with Dagster's run-status sensor context builders, posting to a real HTTP receiver on
127.0.0.1.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import pytest

from rdw_tracking.alerts import (
    WEBHOOK_ENV,
    AlertDeliveryError,
    check_failure_alert_sensor,
    run_failure_alert_sensor,
)
from rdw_tracking.definitions import defs
from rdw_tracking.resources import TargetDatabase

from .conftest import check_results

SECRET = "Alert-s3cret-pw"
TOKEN = "T0KEN-abc123"
# A server nothing listens on, with a password that must never reach an alert.
UNREACHABLE = f"postgresql://postgres:{SECRET}@127.0.0.1:1/nowhere"


@pytest.fixture
def receiver(monkeypatch):
    """A local webhook on a random port; yields the list of JSON bodies it was posted."""
    posts: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            posts.append({"path": self.path, "body": json.loads(self.rfile.read(length))})
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(WEBHOOK_ENV, f"http://127.0.0.1:{server.server_address[1]}/hooks/{TOKEN}")
    try:
        yield posts
    finally:
        server.shutdown()
        server.server_close()


def failure_context(instance, result):
    return dg.build_run_status_sensor_context(
        sensor_name="run_failure_alert_sensor",
        dagster_event=result.get_run_failure_event(),
        dagster_instance=instance,
        dagster_run=result.dagster_run,
    ).for_run_failure()


def success_context(instance, result):
    return dg.build_run_status_sensor_context(
        sensor_name="check_failure_alert_sensor",
        dagster_event=result.get_run_success_event(),
        dagster_instance=instance,
        dagster_run=result.dagster_run,
    )


def assert_no_credential(post: dict) -> None:
    text = json.dumps(post["body"])
    assert SECRET not in text and TOKEN not in text


def test_a_failed_run_posts_one_alert(database_url, run_job, receiver, monkeypatch):
    with dg.instance_for_test() as instance:
        failed = run_job(
            "weekly_collection",
            instance=instance,
            resources={"target_db": TargetDatabase(url=UNREACHABLE)},
        )
        assert not failed.success
        assert run_failure_alert_sensor(failure_context(instance, failed)) is None
    [post] = receiver
    body = post["body"]
    assert post["path"] == f"/hooks/{TOKEN}"
    assert body["kind"] == "run_failure"
    assert body["job"] == "weekly_collection" and body["run_id"] == failed.run_id
    assert "cannot connect to PostgreSQL at postgres@127.0.0.1:1/nowhere" in body["description"]
    assert failed.run_id in body["text"] and "weekly_collection" in body["text"]
    assert_no_credential(post)


def test_a_failed_run_names_the_checks_that_failed_in_it(database_url, run_job, receiver, sql_exec):
    # execution_id as text: the blocking column contract fails, and with it the run.
    sql_exec("ALTER TABLE report_data_weeks ALTER COLUMN execution_id TYPE text")
    with dg.instance_for_test() as instance:
        failed = run_job("verify_execution_tracking", instance=instance)
        assert not failed.success
        assert not check_results(failed)["execution_id_column_contract"].passed
        run_failure_alert_sensor(failure_context(instance, failed))
    [post] = receiver
    body = post["body"]
    assert body["run_id"] == failed.run_id and body["job"] == "verify_execution_tracking"
    assert "execution_id_column_contract" in body["failed_checks"]
    assert "check execution_id_column_contract (ERROR): " in body["description"]
    assert "is text, expected uuid" in body["description"]


def test_a_failed_non_blocking_check_in_a_green_run_posts_one_alert(
    database_url, run_job, receiver
):
    # The template's demo rows hold orphaned execution_ids: execution_ids_exist fails
    # (ERROR, not blocking) and the run still succeeds.
    with dg.instance_for_test() as instance:
        result = run_job("post_collection_validation", instance=instance)
        assert result.success
        checks = check_results(result)
        assert not checks["execution_ids_exist"].passed
        assert check_failure_alert_sensor(success_context(instance, result)) is None
    failed = sorted(name for name, e in checks.items() if not e.passed)
    assert sorted(p["body"]["check"] for p in receiver) == failed
    [orphans] = [p for p in receiver if p["body"]["check"] == "execution_ids_exist"]
    body = orphans["body"]
    assert body["kind"] == "check_failure"
    assert body["job"] == "post_collection_validation" and body["run_id"] == result.run_id
    assert body["asset"] == "execution_id_population" and body["severity"] == "ERROR"
    assert body["description"] == checks["execution_ids_exist"].description
    assert "point at no" in body["description"]
    for post in receiver:
        assert_no_credential(post)


def test_a_green_run_whose_checks_pass_posts_nothing(database_url, run_job, receiver, sql_exec):
    sql_exec(
        "UPDATE report_data_weeks w SET execution_id = NULL WHERE execution_id IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM workflow_executions e WHERE e.id = w.execution_id)"
    )
    with dg.instance_for_test() as instance:
        result = run_job("verify_execution_tracking", instance=instance)
        assert result.success
        failed = [e.check_name for e in result.get_asset_check_evaluations() if not e.passed]
        check_failure_alert_sensor(success_context(instance, result))
    assert sorted(p["body"]["check"] for p in receiver) == sorted(failed)
    assert "execution_ids_exist" not in failed


def test_unset_webhook_skips_quietly(database_url, run_job, monkeypatch):
    monkeypatch.delenv(WEBHOOK_ENV, raising=False)
    with dg.instance_for_test() as instance:
        failed = run_job(
            "weekly_collection",
            instance=instance,
            resources={"target_db": TargetDatabase(url=UNREACHABLE)},
        )
        green = run_job("post_collection_validation", instance=instance)
        skipped_run = run_failure_alert_sensor(failure_context(instance, failed))
        skipped_check = check_failure_alert_sensor(success_context(instance, green))
    for skipped in (skipped_run, skipped_check):
        assert isinstance(skipped, dg.SkipReason)
        assert WEBHOOK_ENV in skipped.skip_message


def test_an_unreachable_webhook_fails_the_tick_without_quoting_it(
    database_url, run_job, monkeypatch
):
    monkeypatch.setenv(WEBHOOK_ENV, f"http://127.0.0.1:1/hooks/{TOKEN}")
    with dg.instance_for_test() as instance:
        failed = run_job(
            "weekly_collection",
            instance=instance,
            resources={"target_db": TargetDatabase(url=UNREACHABLE)},
        )
        with pytest.raises(AlertDeliveryError) as err:
            run_failure_alert_sensor(failure_context(instance, failed))
    assert "retried on the next tick" in str(err.value)
    assert TOKEN not in str(err.value) and "127.0.0.1:1" not in str(err.value)


def test_alert_sensors_are_wired_and_on_by_default():
    for name in ("run_failure_alert_sensor", "check_failure_alert_sensor"):
        sensor = defs.resolve_sensor_def(name)
        assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
        assert sensor.description and WEBHOOK_ENV in sensor.description
