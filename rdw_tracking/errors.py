"""The failures a user can meet, defined once, below every module that raises them.

Each message is one sentence naming the object and the way out. `refuse(...)` is the
step failure for a request that cannot go ahead (bad input, a missing grant, a lock
held elsewhere): Dagster never retries it, since a retry would fail the same way.
"""

import dagster as dg


def refuse(message: str, **metadata) -> dg.Failure:
    """A failure the user must act on: one sentence naming the object and the way out."""
    return dg.Failure(description=message, metadata=metadata or None, allow_retries=False)


class TargetDatabaseError(Exception):
    """A failure a user can act on; its message names the object and the fix."""


class NotRetryable(TargetDatabaseError, dg.Failure):
    """A setting that names nothing real (no such schema, a malformed URL): a retry
    would only fail the same way, so it fails the step once, naming the field to fix."""

    def __init__(self, message: str):
        dg.Failure.__init__(self, description=message, allow_retries=False)


class StatementTimeout(dg.Failure):
    """A statement ran into `statement_timeout`: never retried, since it would again."""

    def __init__(self, message: str):
        super().__init__(description=message, allow_retries=False)
