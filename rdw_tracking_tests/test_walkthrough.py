"""The demo's collection and sensor step, through Dagster's public testing APIs."""

import dagster as dg

from rdw_tracking import walkthrough


def test_collection_then_both_sensors_request_their_validation(database_url):
    with dg.instance_for_test() as instance:
        collection, *validations = walkthrough.collection_and_sensors(instance)
    assert collection.success and collection.dagster_run.job_name == "weekly_collection"
    by_sensor = {r.dagster_run.tags["dagster/sensor_name"]: r for r in validations}
    assert set(by_sensor) == {"collection_run_sensor", "workflow_executions_sensor"}
    assert len(validations) == 2
    for result in validations:
        assert result.success and result.dagster_run.job_name == "post_collection_validation"
    triggered = by_sensor["collection_run_sensor"].dagster_run.tags
    assert triggered["rdw/triggered_by_run"] == collection.run_id
    assert triggered["dagster/run_key"] == collection.run_id
    polled = by_sensor["workflow_executions_sensor"].dagster_run.tags
    assert polled["rdw/new_executions"] == "1"
