"""Alerts: a failed run, or a failed check in a green run, posted to a webhook.

Two sensors, on by default and quiet until `RDW_ALERT_WEBHOOK_URL` is set:

- `run_failure_alert_sensor`: every failed run of a job in this code location.
- `check_failure_alert_sensor`: every failed check evaluation of a successful run. A
  non-blocking check (`execution_ids_exist`, the trend) that fails leaves its run green,
  so no run-failure alert would ever mention it.

Each alert is one JSON POST: `text` (a line a chat webhook shows as is), `kind`, `job`,
`run_id`, `description` and, for checks, `check`, `asset` and `severity`. Descriptions
are redacted of any database password, and the webhook's own URL (which often holds its
token) is never logged or posted.
"""

# No `from __future__ import annotations`: Dagster reads sensor annotations at runtime.

import json
import os
import urllib.error
import urllib.request

import dagster as dg

from rdw_tracking.resources import URL_ENV, redact

WEBHOOK_ENV = "RDW_ALERT_WEBHOOK_URL"
POST_TIMEOUT_S = 10
# Chat webhooks cut long messages; the UI has the whole error.
MAX_DESCRIPTION = 2_000


class AlertDeliveryError(Exception):
    """The webhook did not take an alert: the tick fails and the next one retries it."""


def webhook_url() -> str | None:
    return os.environ.get(WEBHOOK_ENV) or None


def clean(text: str | None) -> str:
    """One alert's description: no password of the looked-after database, bounded length."""
    text = redact(text or "", os.environ.get(URL_ENV))
    return text if len(text) <= MAX_DESCRIPTION else text[: MAX_DESCRIPTION - 3] + "..."


def post(url: str, payload: dict) -> None:
    """POST `payload` as JSON; raises AlertDeliveryError naming neither URL nor token."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "rdw_tracking-alerts"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=POST_TIMEOUT_S) as response:
            response.read()
    except urllib.error.HTTPError as err:
        raise AlertDeliveryError(
            f"the alert webhook ({WEBHOOK_ENV}) answered HTTP {err.code}; the alert for run "
            f"{payload.get('run_id')} is retried on the next tick"
        ) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise AlertDeliveryError(
            f"the alert webhook ({WEBHOOK_ENV}) could not be reached ({type(reason).__name__}); "
            f"the alert for run {payload.get('run_id')} is retried on the next tick"
        ) from None


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
        "(job, run id, the failure and each failed step's error). Skips while it is unset."
    ),
)
def run_failure_alert_sensor(context: dg.RunFailureSensorContext):
    """Posts each failed run (job, run id, the failure and each failed step's error) to the
    webhook in `RDW_ALERT_WEBHOOK_URL`; skips quietly while it is unset."""
    url = webhook_url()
    if not url:
        return dg.SkipReason(f"{WEBHOOK_ENV} is not set: no alert sent")
    post(url, run_failure_payload(context))
    context.log.info(f"alert sent for failed run {context.dagster_run.run_id}")
    return None


@dg.run_status_sensor(
    name="check_failure_alert_sensor",
    run_status=dg.DagsterRunStatus.SUCCESS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description=(
        "Posts every failed asset check of a successful run (a non-blocking check leaves "
        f"its run green) to the webhook in env {WEBHOOK_ENV}: check, asset, severity, job, "
        "run id and the check's description. Skips while it is unset."
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
    for evaluation in failures:
        post(url, check_failure_payload(run, evaluation))
    if failures:
        context.log.info(f"{len(failures)} check failure alert(s) sent for run {run.run_id}")
    return None


alert_sensors = [run_failure_alert_sensor, check_failure_alert_sensor]
