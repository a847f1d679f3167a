"""The three tables carry Dagster's standard table metadata: name and row count."""

import dagster as dg

from rdw_tracking.assets.tables import observe_tables
from rdw_tracking.definitions import defs
from rdw_tracking.resources import TargetDatabase

TABLES = ("report_data_weeks", "workflow_executions", "report_data_collections")


def test_table_assets_name_their_table_in_the_definition():
    for name in TABLES:
        spec = defs.resolve_assets_def(name).get_asset_spec(dg.AssetKey(name))
        assert spec.metadata["dagster/table_name"] == f"public.{name}"
        assert spec.group_name == "execution_tracking"


def test_observation_records_row_count_and_table_name(database_url, sql_exec):
    expected = {
        name: sql_exec(f"SELECT count(*) FROM public.{name}")[0][0]  # noqa: S608
        for name in TABLES
    }
    database = TargetDatabase(url=database_url).endpoint().database
    with dg.instance_for_test() as instance:
        # What the UI's "Observe" button runs: an asset job over the observable tables.
        job = dg.define_asset_job("observe", selection=dg.AssetSelection.assets(*TABLES))
        observe = dg.Definitions(
            assets=[observe_tables],
            jobs=[job],
            resources={"target_db": TargetDatabase(url=database_url)},
        ).resolve_job_def("observe")
        result = observe.execute_in_process(instance=instance)
        assert result.success
        for name in TABLES:
            [record] = instance.fetch_observations(dg.AssetKey(name), limit=1).records
            metadata = record.asset_observation.metadata
            assert metadata["dagster/row_count"].value == expected[name]
            assert metadata["dagster/table_name"].value == f"{database}.public.{name}"
    assert expected["report_data_weeks"] == 2_600
