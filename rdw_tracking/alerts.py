"""Alerts: a failed run, or a failed check in a green run, posted to a webhook.

Three sensors, on by default and quiet until `RDW_ALERT_WEBHOOK_URL` is set:

- `run_failure_alert_sensor`: every failed run of a job in this code location.
- `check_failure_alert_sensor`: every failed check evaluation of a successful run. A
  non-blocking check (`execution_ids_exist`, the trend) that fails leaves its run green,
  so no run-failure alert would ever mention it.
- `undelivered_alerts_sensor`: sends again what the webhook did not take. A run-status
  sensor's cursor moves past a run even when its alert failed, so every alert is kept
  in Dagster's storage before it is sent, and stays there (oldest first, at most
  `MAX_UNDELIVERED`) until the webhook takes it.

Each alert is one JSON POST: `text` (a line a chat webhook shows as is), `kind`, `job`,
`run_id`, `description` and, for checks, `check`, `asset` and `severity`. One deadline
bounds all of a tick's deliveries; a redirect is a failed delivery, never followed; no
error quotes what the receiver answered. Descriptions are redacted of the password of
every database URL the process knows (`RDW_DATABASE_URL`, each fleet entry's
`url_env`, Dagster's storage, the broker), and the webhook's own URL (which often holds
its token) is never logged or posted.
"""

# No `from __future__ import annotations`: Dagster reads sensor annotations at runtime.

import http.client
import json
import os
import socket
import threading
import time
from urllib.parse import urlsplit

import dagster as dg

from rdw_tracking import fleet
from rdw_tracking.resources import URL_ENV, redact

WEBHOOK_ENV = "RDW_ALERT_WEBHOOK_URL"
# One deadline for every delivery of a tick, well inside Dagster's 60 s sensor limit: a
# receiver that drips its answer a byte at a time cannot hold the tick longer.
TICK_DEADLINE_S = 10
# Chat webhooks cut long messages; the UI has the whole error.
MAX_DESCRIPTION = 2_000
# Alerts that could not be delivered wait in Dagster's storage (its key-value store, next
# to runs and events), oldest first, and are sent again on later ticks; beyond this many
# the oldest are dropped, and the count of dropped ones is kept and shown.
MAX_UNDELIVERED = 200
UNDELIVERED_KEY = "rdw_tracking/alerts/undelivered"
# Variables whose URL may carry a password that an error message could quote.
_SECRET_URL_ENVS = (
    URL_ENV,
    "RDW_DEMO_DATABASE_URL",
    "RDW_DAGSTER_STORAGE_URL",
    "RDW_CELERY_BROKER",
)
_READ_CHUNK = 8_192
_MAX_ANSWER = 65_536  # of a receiver's body, read and dropped, never quoted
# Sensors of one code server share this; a second tick finding it taken leaves the
# delivery to the first, so no alert is sent twice by two ticks at once.
_DELIVERING = threading.Lock()


class AlertDeliveryError(Exception):
    """The webhook did not take an alert: it is kept, and a later tick sends it again."""


def webhook_url() -> str | None:
    return os.environ.get(WEBHOOK_ENV) or None


def secret_urls() -> list[str]:
    """Every URL of this process that may carry a password: the looked-after database's,
    each fleet entry's `url_env`, Dagster's storage and the celery broker."""
    names = list(_SECRET_URL_ENVS)
    try:
        found = fleet.load()
    except fleet.FleetFileError:  # the definitions refuse the file; nothing to add here
        found = None
    if found is not None:
        names += [db.url_env for db in found.databases]
    return [os.environ[name] for name in names if os.environ.get(name)]


def clean(text: str | None) -> str:
    """One alert's description: no password of any database this process knows (on its
    own or inside a URL), bounded length."""
    text = text or ""
    for url in secret_urls():
        text = redact(text, url)
    text = redact(text, None)
    return text if len(text) <= MAX_DESCRIPTION else text[: MAX_DESCRIPTION - 3] + "..."


def post(url: str, payload: dict, deadline: float) -> None:
    """POST `payload` as JSON, done by `deadline` (time.monotonic()) or failed; raises
    AlertDeliveryError naming neither URL, token nor anything the receiver answered.

    Redirects are not followed: a 3xx is a failed delivery (a GET without the body at
    the new address would be no alert at all)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise AlertDeliveryError(
            f"the alert webhook ({WEBHOOK_ENV}) is not an http(s) URL; set it to the "
            "receiver's https://... address"
        )
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _late()
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.hostname, port, timeout=remaining)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # Per-read timeouts do not bound a receiver that answers a byte at a time: at the
    # deadline the socket is shut, which ends any read in progress.
    shut = threading.Event()
    watchdog = threading.Timer(remaining, _shut, [conn, shut])
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.request(
            "POST",
            path,
            body=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json", "User-Agent": "rdw_tracking-alerts"},
        )
        response = conn.getresponse()
        read = 0
        while read < _MAX_ANSWER:
            chunk = response.read(_READ_CHUNK)
            if not chunk:
                if response.length:  # the connection ended before the body did
                    raise http.client.IncompleteRead(b"", response.length)
                break
            read += len(chunk)
        status = response.status
    except (http.client.HTTPException, OSError, ValueError) as err:
        if shut.is_set():
            raise _late() from None
        raise AlertDeliveryError(
            f"the alert webhook ({WEBHOOK_ENV}) could not be reached or answered no valid "
            f"HTTP ({type(err).__name__}); the alert is kept and sent again on a later tick"
        ) from None
    finally:
        watchdog.cancel()
        conn.close()
    if shut.is_set():  # what was read by then may be a cut-off answer
        raise _late()
    if 300 <= status < 400:
        raise AlertDeliveryError(
            f"the alert webhook ({WEBHOOK_ENV}) answered HTTP {status}, a redirect, which is "
            "not followed; set it to the address that takes the POST itself"
        )
    if not 200 <= status < 300:
        raise AlertDeliveryError(
            f"the alert webhook ({WEBHOOK_ENV}) answered HTTP {status}; the alert is kept "
            "and sent again on a later tick"
        )


def _shut(conn: http.client.HTTPConnection, shut: threading.Event) -> None:
    shut.set()
    if conn.sock is not None:
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _late() -> AlertDeliveryError:
    return AlertDeliveryError(
        f"the alert webhook ({WEBHOOK_ENV}) did not take the tick's alerts within "
        f"{TICK_DEADLINE_S} s; the rest are kept and sent again on a later tick"
    )


# -- undelivered alerts, kept in Dagster's storage ------------------------------------------


def undelivered(instance: dg.DagsterInstance) -> tuple[list[dict], int]:
    """(the alerts waiting, oldest first; how many were dropped over the bound so far)."""
    text = instance.run_storage.get_cursor_values({UNDELIVERED_KEY}).get(UNDELIVERED_KEY)
    if not text:
        return [], 0
    try:
        kept = json.loads(text)
        return list(kept["alerts"]), int(kept.get("dropped", 0))
    except (ValueError, KeyError, TypeError):
        return [], 0  # not ours to guess at: start again rather than fail every tick


def _keep(instance: dg.DagsterInstance, alerts: list[dict], dropped: int) -> None:
    if len(alerts) > MAX_UNDELIVERED:
        dropped += len(alerts) - MAX_UNDELIVERED
        alerts = alerts[-MAX_UNDELIVERED:]
    text = json.dumps({"alerts": alerts, "dropped": dropped})
    instance.run_storage.set_cursor_values({UNDELIVERED_KEY: text})


def _alert_id(payload: dict) -> str:
    return ":".join(str(payload.get(k) or "") for k in ("kind", "run_id", "check", "asset"))


def deliver(instance: dg.DagsterInstance, url: str, new: list[dict], log) -> int:
    """Keep `new` with the alerts still waiting, then send them, oldest first, under one
    deadline for the whole tick, stopping at the first the webhook does not take.
    Returns how many were sent; raises AlertDeliveryError when some still wait, after
    keeping them, so that the tick's status says so."""
    with _DELIVERING:
        deadline = time.monotonic() + TICK_DEADLINE_S
        waiting, dropped = undelivered(instance)
        known = {_alert_id(a) for a in waiting}
        waiting += [a for a in new if _alert_id(a) not in known]
        _keep(instance, waiting, dropped)  # kept before any attempt: a crash loses nothing
        waiting, dropped = undelivered(instance)
        sent, problem = 0, None
        for payload in waiting:
            try:
                post(url, payload, deadline)
            except AlertDeliveryError as err:
                problem = err
                break
            sent += 1
            log.info(f"alert sent: {payload.get('kind')} of run {payload.get('run_id')}")
        if problem is None and dropped:
            log.warning(f"{dropped} older alert(s) had been dropped over the bound")
            dropped = 0
        _keep(instance, waiting[sent:], dropped)
    if problem is not None:
        left = len(waiting) - sent
        lost = f", {dropped} older ones dropped over the bound of {MAX_UNDELIVERED}"
        raise AlertDeliveryError(
            f"{problem} ({left} undelivered alert(s) kept, oldest first{lost if dropped else ''})"
        )
    return sent


def undelivered_status(instance: dg.DagsterInstance) -> str:
    """What waits to be sent, for a tick's status: '' when nothing does."""
    waiting, dropped = undelivered(instance)
    if not waiting and not dropped:
        return ""
    oldest = waiting[0] if waiting else {}
    lost = f", {dropped} dropped over the bound of {MAX_UNDELIVERED}" if dropped else ""
    return f"{len(waiting)} undelivered alert(s){lost}" + (
        f", oldest: {oldest.get('kind')} of run {oldest.get('run_id')}" if oldest else ""
    )


def step_error(failure) -> str:
    """What went wrong in a step: a `dg.Failure`'s description, else the innermost error
    (Dagster wraps the user's exception in a DagsterExecutionStepExecutionError)."""
    user = getattr(failure, "user_failure_data", None)
    if user is not None and user.description:
        return user.description
    error = failure.error
    while error is not None and error.cause is not None:
        error = error.cause
    return error.message.strip() if error is not None else "unknown error"


def run_failure_payload(context: dg.RunFailureSensorContext) -> dict:
    run = context.dagster_run
    steps = [
        f"{event.step_key}: {step_error(event.event_specific_data)}"
        for event in context.get_step_failure_events()
        if event.event_specific_data
    ]
    # Checks that failed in the failed run: check_failure_alert_sensor sees green runs only.
    checks = failed_checks(context.instance, run.run_id)
    notes = [f"check {e.check_name} ({e.severity.value}): {e.description}" for e in checks]
    parts = [context.failure_event.message or "", *steps, *notes]
    description = clean(" | ".join(p for p in parts if p))
    return {
        "text": f"rdw_tracking: run {run.run_id} of {run.job_name} failed: {description}",
        "kind": "run_failure",
        "job": run.job_name,
        "run_id": run.run_id,
        "description": description,
        "failed_checks": [e.check_name for e in checks],
    }


def failed_checks(instance: dg.DagsterInstance, run_id: str) -> list[dg.AssetCheckEvaluation]:
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
    ).records
    evaluations = [record.event_log_entry.dagster_event.event_specific_data for record in records]
    return [e for e in evaluations if isinstance(e, dg.AssetCheckEvaluation) and not e.passed]


def check_failure_payload(run: dg.DagsterRun, evaluation: dg.AssetCheckEvaluation) -> dict:
    description = clean(evaluation.description)
    asset = evaluation.asset_key.to_user_string()
    severity = evaluation.severity.value
    return {
        "text": (
            f"rdw_tracking: check {evaluation.check_name} on {asset} failed ({severity}) "
            f"in run {run.run_id} of {run.job_name}: {description}"
        ),
        "kind": "check_failure",
        "job": run.job_name,
        "run_id": run.run_id,
        "check": evaluation.check_name,
        "asset": asset,
        "severity": severity,
        "description": description,
    }


@dg.run_failure_sensor(
    name="run_failure_alert_sensor",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description=(
        f"Posts every failed run of this code location to the webhook in env {WEBHOOK_ENV} "
        "(job, run id, the failure and each failed step's error). An alert the webhook does "
        "not take is kept and sent again by undelivered_alerts_sensor. Skips while it is unset."
    ),
)
def run_failure_alert_sensor(context: dg.RunFailureSensorContext):
    """Posts each failed run (job, run id, the failure and each failed step's error) to the
    webhook in `RDW_ALERT_WEBHOOK_URL`; skips quietly while it is unset. An alert the
    webhook does not take fails the tick, naming the count kept for later ticks."""
    url = webhook_url()
    if not url:
        return dg.SkipReason(f"{WEBHOOK_ENV} is not set: no alert sent")
    deliver(context.instance, url, [run_failure_payload(context)], context.log)
    return None


@dg.run_status_sensor(
    name="check_failure_alert_sensor",
    run_status=dg.DagsterRunStatus.SUCCESS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description=(
        "Posts every failed asset check of a successful run (a non-blocking check leaves "
        f"its run green) to the webhook in env {WEBHOOK_ENV}: check, asset, severity, job, "
        "run id and the check's description. An alert the webhook does not take is kept "
        "and sent again by undelivered_alerts_sensor. Skips while it is unset."
    ),
)
def check_failure_alert_sensor(context: dg.RunStatusSensorContext):
    """Posts each failed check evaluation of a successful run (check, asset, severity, job,
    run id, description) to the webhook in `RDW_ALERT_WEBHOOK_URL`: failed non-blocking
    checks leave their run green, so the run-failure alert never sees them."""
    url = webhook_url()
    if not url:
        return dg.SkipReason(f"{WEBHOOK_ENV} is not set: no alert sent")
    run = context.dagster_run
    failures = failed_checks(context.instance, run.run_id)
    if failures:
        payloads = [check_failure_payload(run, evaluation) for evaluation in failures]
        deliver(context.instance, url, payloads, context.log)
    return None


@dg.sensor(
    name="undelivered_alerts_sensor",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description=(
        "Sends again, oldest first, the alerts the webhook in env "
        f"{WEBHOOK_ENV} did not take (kept in Dagster's storage, at most {MAX_UNDELIVERED}); "
        "each tick's status says how many still wait."
    ),
)
def undelivered_alerts_sensor(context: dg.SensorEvaluationContext):
    """Sends again the alerts the webhook did not take, oldest first, under one deadline
    per tick. A run-status sensor's cursor moves past a run whether or not its alert got
    through, so this is what gets a lost alert delivered. The tick fails while some still
    wait, naming the count; its status (and cursor) say what waits."""
    waiting, dropped = undelivered(context.instance)
    if not waiting and not dropped:
        context.update_cursor(json.dumps({"undelivered": 0}))
        return dg.SkipReason("no undelivered alert")
    url = webhook_url()
    if not url:
        return dg.SkipReason(
            f"{undelivered_status(context.instance)}; {WEBHOOK_ENV} is not set: none sent"
        )
    try:
        sent = deliver(context.instance, url, [], context.log)
    finally:
        left, _ = undelivered(context.instance)
        context.update_cursor(json.dumps({"undelivered": len(left)}))
    return dg.SkipReason(f"{sent} undelivered alert(s) sent; none waits")


alert_sensors = [run_failure_alert_sensor, check_failure_alert_sensor, undelivered_alerts_sensor]
