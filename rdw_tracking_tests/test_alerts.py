"""Alerts reach a webhook: a failed run, and a failed check in a green run.

The jobs run in process against a persistent test instance; the sensors are evaluated
with Dagster's run-status sensor context builders, posting to a real HTTP receiver on
127.0.0.1.
"""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import pytest

from rdw_tracking import alerts
from rdw_tracking.alerts import (
    WEBHOOK_ENV,
    AlertDeliveryError,
    check_failure_alert_sensor,
    run_failure_alert_sensor,
    undelivered_alerts_sensor,
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
    assert "sent again on a later tick" in str(err.value)
    assert "1 undelivered alert(s) kept" in str(err.value)
    assert TOKEN not in str(err.value) and "127.0.0.1:1" not in str(err.value)


def test_alert_sensors_are_wired_and_on_by_default():
    for name in (
        "run_failure_alert_sensor",
        "check_failure_alert_sensor",
        "undelivered_alerts_sensor",
    ):
        sensor = defs.resolve_sensor_def(name)
        assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
        assert sensor.description and WEBHOOK_ENV in sensor.description


# -- undelivered alerts are kept and sent again; a receiver cannot hold a tick -------------


class Scripted:
    """A receiver on 127.0.0.1 that answers each request with the next of `answers`: a
    status code, or a function writing raw bytes to the client's socket. Records each
    request as (method, path, body)."""

    def __init__(self, monkeypatch, answers):
        self.answers = list(answers)
        self.requests: list[tuple[str, str, bytes]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()
        monkeypatch.setenv(WEBHOOK_ENV, f"http://127.0.0.1:{self.port}/hooks/{TOKEN}")

    def serve(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with client:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = client.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                length = next(
                    (
                        int(v)
                        for k, _, v in (line.partition(": ") for line in lines[1:])
                        if k.lower() == "content-length"
                    ),
                    0,
                )
                while len(body) < length:
                    body += client.recv(65536)
                method, path, _ = lines[0].split(" ", 2)
                self.requests.append((method, path, body))
                answer = self.answers.pop(0) if self.answers else 200
                try:
                    if callable(answer):
                        answer(client)
                    else:
                        client.sendall(f"HTTP/1.1 {answer} X\r\nContent-Length: 0\r\n\r\n".encode())
                except OSError:
                    pass

    def bodies(self) -> list[dict]:
        return [json.loads(body) for method, _, body in self.requests if method == "POST"]

    def close(self):
        self.listener.close()


@pytest.fixture
def scripted(monkeypatch):
    made = []

    def make(*answers):
        made.append(Scripted(monkeypatch, answers))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def failed_run(run_job, instance):
    failed = run_job(
        "weekly_collection",
        instance=instance,
        resources={"target_db": TargetDatabase(url=UNREACHABLE)},
    )
    assert not failed.success
    return failed


def undelivered_tick(instance):
    """One tick of undelivered_alerts_sensor, its context entered and closed."""
    with dg.build_sensor_context(instance=instance) as context:
        return undelivered_alerts_sensor(context)


def test_an_alert_the_webhook_refused_is_sent_on_a_later_tick(database_url, run_job, scripted):
    """A 500, then a 200: the alert is kept, named in the tick's status, and the next tick
    of undelivered_alerts_sensor sends it (Dagster's run-status cursor has moved on)."""
    receiver = scripted(500, 500)
    with dg.instance_for_test() as instance:
        failed = failed_run(run_job, instance)
        with pytest.raises(AlertDeliveryError) as err:
            run_failure_alert_sensor(failure_context(instance, failed))
        assert "answered HTTP 500" in str(err.value)
        assert "1 undelivered alert(s) kept" in str(err.value)
        assert alerts.undelivered_status(instance).startswith("1 undelivered alert(s)")
        # Still refused on the next tick: still kept, the tick's error says how many.
        with pytest.raises(AlertDeliveryError, match="1 undelivered alert"):
            undelivered_tick(instance)
        skip = undelivered_tick(instance)
        assert (
            isinstance(skip, dg.SkipReason) and "1 undelivered alert(s) sent" in skip.skip_message
        )
        assert alerts.undelivered(instance) == ([], 0)
        quiet = undelivered_tick(instance)
        assert quiet.skip_message == "no undelivered alert"
    posts = receiver.bodies()
    assert len(posts) == 3 and all(p["run_id"] == failed.run_id for p in posts)


def test_undelivered_alerts_are_bounded_and_sent_oldest_first(
    database_url, run_job, scripted, monkeypatch
):
    monkeypatch.setattr(alerts, "MAX_UNDELIVERED", 3)
    monkeypatch.setenv(WEBHOOK_ENV, f"http://127.0.0.1:1/hooks/{TOKEN}")  # nobody listens
    with dg.instance_for_test() as instance:
        runs = [failed_run(run_job, instance) for _ in range(5)]
        for run in runs:
            with pytest.raises(AlertDeliveryError):
                run_failure_alert_sensor(failure_context(instance, run))
        waiting, dropped = alerts.undelivered(instance)
        assert [a["run_id"] for a in waiting] == [r.run_id for r in runs[2:]] and dropped == 2
        assert "3 undelivered alert(s), 2 dropped" in alerts.undelivered_status(instance)
        receiver = scripted()
        undelivered_tick(instance)
        assert alerts.undelivered(instance) == ([], 0)
    assert [p["run_id"] for p in receiver.bodies()] == [r.run_id for r in runs[2:]]


def drip(client):
    """A status line, then a byte every 0.3 s for ever (until the client goes)."""
    client.sendall(b"HTTP/1.1 200 OK\r\n")
    for _ in range(200):
        client.sendall(b"X")
        time.sleep(0.3)


def test_a_slow_drip_receiver_cannot_hold_the_tick(database_url, run_job, scripted, monkeypatch):
    """Two alerts to a receiver that answers a byte every 0.3 s: the tick ends at its one
    deadline (2 s here), not per read, and both alerts are kept."""
    monkeypatch.setattr(alerts, "TICK_DEADLINE_S", 2)
    scripted(drip, drip)
    with dg.instance_for_test() as instance:
        result = run_job("post_collection_validation", instance=instance)
        assert (
            result.success
            and len([e for e in result.get_asset_check_evaluations() if not e.passed]) >= 1
        )
        started = time.monotonic()
        with pytest.raises(AlertDeliveryError) as err:
            check_failure_alert_sensor(success_context(instance, result))
        took = time.monotonic() - started
        waiting, _ = alerts.undelivered(instance)
    assert took < 4, took
    assert "within 2 s" in str(err.value)
    failed = [e for e in result.get_asset_check_evaluations() if not e.passed]
    assert len(waiting) == len(failed)


def answer_raw(data: bytes):
    def answer(client):
        client.sendall(data)

    return answer


@pytest.mark.parametrize(
    "answer, words",
    [
        (answer_raw(b"NONSENSE Receiver-Secret-Text\r\n\r\n"), "BadStatusLine"),
        (answer_raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b"), "IncompleteRead"),
        (
            answer_raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n"),
            "IncompleteRead",
        ),
        (
            answer_raw(
                b"HTTP/1.1 200 OK\r\n" + b"X-Receiver-Secret-Text: " + b"a" * 70_000 + b"\r\n\r\n"
            ),
            "LineTooLong",
        ),
        (answer_raw(b""), "RemoteDisconnected"),
    ],
)
def test_every_http_client_error_is_a_failed_delivery_quoting_nothing(
    database_url, run_job, scripted, answer, words
):
    scripted(answer)
    with dg.instance_for_test() as instance:
        failed = failed_run(run_job, instance)
        with pytest.raises(AlertDeliveryError) as err:
            run_failure_alert_sensor(failure_context(instance, failed))
        assert len(alerts.undelivered(instance)[0]) == 1
    message = str(err.value)
    assert words in message, message
    assert "Receiver-Secret-Text" not in message and TOKEN not in message


def test_a_redirect_is_a_failed_delivery_and_is_not_followed(database_url, run_job, scripted):
    redirect = answer_raw(
        b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n"
    )
    receiver = scripted(redirect)
    with dg.instance_for_test() as instance:
        failed = failed_run(run_job, instance)
        with pytest.raises(AlertDeliveryError) as err:
            run_failure_alert_sensor(failure_context(instance, failed))
        assert len(alerts.undelivered(instance)[0]) == 1
    assert "answered HTTP 302, a redirect, which is not followed" in str(err.value)
    assert [(m, p) for m, p, _ in receiver.requests] == [("POST", f"/hooks/{TOKEN}")]


# -- redaction knows every fleet entry's password ------------------------------------------


def test_alerts_mask_every_fleet_entrys_password(database_url, tmp_path, monkeypatch):
    """Each entry's url_env password is masked on its own and inside a URL, as the
    looked-after database's is."""
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "databases:\n  - {name: eu, url_env: RDW_TEST_ALERT_EU}\n"
        "  - {name: us, url_env: RDW_TEST_ALERT_US}\n"
    )
    monkeypatch.setenv("RDW_FLEET_FILE", str(path))
    monkeypatch.setenv("RDW_TEST_ALERT_EU", "postgresql://rdw:Eu-Pa55word@eu-db:5432/reports")
    monkeypatch.setenv("RDW_TEST_ALERT_US", "host=us-db user=rdw password=Us-Pa55word dbname=r")
    text = (
        "eu said Eu-Pa55word; us said Us-Pa55word; "
        "url postgresql://other:Eu-Pa55word@elsewhere/db and Us-Pa55word@x"
    )
    cleaned = alerts.clean(text)
    assert "Eu-Pa55word" not in cleaned and "Us-Pa55word" not in cleaned
    assert cleaned.startswith("eu said ***; us said ***")
