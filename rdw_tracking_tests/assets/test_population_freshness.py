"""The population snapshot carries a daily freshness policy, and the daemon judges it.

Dagster 1.13 has no public call that evaluates a freshness policy: the freshness daemon
does it, every 30 s. The second test runs one iteration of that daemon (Dagster's own
test helpers, pinned with dagster==1.13.27) over the project's code location, with the
clock moved, so it tests what the UI will show.
"""

import datetime as dt

import dagster as dg
from dagster._core.definitions.freshness import CronFreshnessPolicy, FreshnessState
from dagster._core.test_utils import create_test_daemon_workspace_context, freeze_time
from dagster._core.workspace.load_target import ModuleTarget
from dagster._daemon.freshness import FreshnessDaemon

from rdw_tracking.assets import DAILY_SNAPSHOT_FRESHNESS
from rdw_tracking.definitions import defs

POPULATION = dg.AssetKey("execution_id_population")


def test_population_asset_carries_the_daily_freshness_policy():
    spec = defs.resolve_assets_def("execution_id_population").get_asset_spec(POPULATION)
    policy = spec.freshness_policy
    assert policy == DAILY_SNAPSHOT_FRESHNESS
    assert isinstance(policy, CronFreshnessPolicy)
    # An hour after daily_population_snapshot (06:00 UTC), looking back one day.
    assert policy.deadline_cron == "0 7 * * *" and policy.timezone == "UTC"
    assert policy.lower_bound_delta == dt.timedelta(hours=24)


def freshness(instance, context, now: dt.datetime) -> FreshnessState:
    """One iteration of the freshness daemon at `now`; the population asset's state."""
    with freeze_time(now):
        list(FreshnessDaemon().run_iteration(context))
    return instance.get_freshness_state_records([POPULATION])[POPULATION].freshness_state


def test_a_snapshot_that_did_not_run_today_shows_as_stale(database_url, run_job):
    target = ModuleTarget(
        module_name="rdw_tracking.definitions",
        attribute=None,
        working_directory=None,
        location_name="rdw_tracking",
    )
    with (
        dg.instance_for_test() as instance,
        create_test_daemon_workspace_context(target, instance) as context,
    ):
        now = dt.datetime.now(dt.timezone.utc)
        # Never materialized: Dagster cannot judge it yet (UNKNOWN, not FAIL).
        assert freshness(instance, context, now) == FreshnessState.UNKNOWN
        assert run_job("post_collection_validation", instance=instance).success
        assert freshness(instance, context, now) == FreshnessState.PASS
        # Two days on, no snapshot since: stale.
        assert freshness(instance, context, now + dt.timedelta(days=2)) == FreshnessState.FAIL
