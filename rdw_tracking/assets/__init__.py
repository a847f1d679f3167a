"""The tracking assets, one module per concern of the spec, each with its checks."""

import dagster as dg

GROUP = "execution_tracking"

# Read-only assets ride out a database restart or a dropped connection; a user-facing
# error is raised as `refuse(...)`, which is never retried.
READ_RETRY = dg.RetryPolicy(max_retries=3, delay=1, backoff=dg.Backoff.EXPONENTIAL)


def refuse(message: str, **metadata) -> dg.Failure:
    """A failure the user must act on: one sentence naming the object and the way out."""
    return dg.Failure(description=message, metadata=metadata or None, allow_retries=False)
