"""The population snapshot and its checks on every layout: the spec's figures, exactly.

The latest-rows sample finds its candidates by `tableoid@ctid`: partitions and child
tables repeat each other's ctids, so candidates by ctid alone named rows of other leaves.
"""

import pytest

from rdw_tracking_tests.assets.test_population import assert_matches_spec, snapshot


@pytest.mark.parametrize("tail_blocks", [None, 1])
def test_snapshot_matches_the_spec_on_every_layout(
    layout, layout_url, sql_exec, run_job, monkeypatch, tail_blocks
):
    from rdw_tracking.population import samples as population

    if tail_blocks:  # a short tail: the pass gathers the candidates (PostgreSQL 16 and later)
        monkeypatch.setattr(population, "TAIL_BLOCKS", tail_blocks)
        monkeypatch.setattr(population, "SAMPLE_CANDIDATES_MAX", 10**9)
    # A latest row far from the end of its leaf's heap.
    sql_exec(
        "UPDATE report_data_weeks SET created_at = now() - interval '1 minute' "
        "WHERE id = (SELECT id FROM report_data_weeks WHERE created_at < now() - interval "
        "'300 days' ORDER BY created_at LIMIT 1)"
    )
    result, meta, checks = snapshot(run_job)
    assert result.success
    assert_matches_spec(sql_exec, meta)
    latest = sql_exec("SELECT id::text FROM report_data_weeks ORDER BY created_at DESC LIMIT 5")
    assert [r.data["id"] for r in meta["sample"].records] == [r[0] for r in latest]
    orphans = sql_exec(
        "SELECT count(*) FROM report_data_weeks w WHERE execution_id IS NOT NULL AND NOT EXISTS"
        " (SELECT 1 FROM workflow_executions e WHERE e.id = w.execution_id)"
    )[0][0]
    assert checks["execution_ids_exist"].metadata["orphan_count"].value == orphans > 0
