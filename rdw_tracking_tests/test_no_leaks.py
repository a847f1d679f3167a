"""No leaks: with a password in the database URL, every job runs once (several fail on
purpose) and the password appears nowhere — not in the event log, run records, tags or
run config, metadata, exception text, compute log files, or the process's own output."""

import datetime as dt
from pathlib import Path

import dagster as dg
import pytest
from dagster._serdes import serialize_value
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from rdw_tracking.resources import TargetDatabase, TargetDatabaseError
from rdw_tracking_tests.assets.test_population import failure_text
from rdw_tracking_tests.conftest import PASSWORD, launch_refusal

CUTOFF = (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=30)).isoformat()


def with_params(url: str, **params) -> str:
    return make_conninfo("", **{**conninfo_to_dict(url), **params})


def rollback(**config) -> dict:
    return {"ops": {"execution_id_rollback": {"config": {"cutoff_date": CUTOFF, **config}}}}


def everything_recorded(instance: dg.DagsterInstance, folder: Path) -> dict[str, str]:
    """Every place the instance keeps something, as text: {where: text}."""
    texts = {}
    for record in instance.get_run_records():
        run = record.dagster_run
        texts[f"run record {run.job_name} {run.run_id}"] = f"{serialize_value(run)}\n{record!r}"
        texts[f"event log {run.job_name} {run.run_id}"] = "\n".join(
            serialize_value(entry) for entry in instance.all_logs(run.run_id)
        )
    for path in folder.rglob("*"):
        if path.is_file():
            texts[f"file {path.relative_to(folder)}"] = path.read_bytes().decode("utf-8", "replace")
    return texts


def test_password_appears_nowhere(password_url, run_job, tmp_path, capfd, monkeypatch, sql_exec):
    wrong = with_params(password_url, password="not-the-" + PASSWORD)  # contains PASSWORD
    unreachable = with_params(password_url, host="127.0.0.1", port="1")
    outcomes: dict[str, tuple[bool, str]] = {}
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:

        def run(label: str, job: str, config: dict | None = None, url: str = password_url):
            monkeypatch.setenv("RDW_DATABASE_URL", url)
            result = run_job(job, config, instance=instance)
            outcomes[label] = (result.success, failure_text(result))  # with causes
            return result

        run("verify", "verify_execution_tracking")
        run("post", "post_collection_validation")
        run("indexes", "create_execution_id_indexes")
        run("fk refused by orphans", "add_execution_id_foreign_key")
        run("rollback dry run", "rollback_execution_id", rollback())
        run("rollback mismatch", "rollback_execution_id", rollback(dry_run=False, expected_rows=1))
        run("rollback", "rollback_execution_id", rollback(dry_run=False))
        restore = {"ops": {"execution_id_restore": {"config": {"dry_run": False}}}}
        run("restore", "restore_execution_id", restore)
        run("collection", "weekly_collection")
        # A refused login fails at once, read jobs included; a server that is not
        # there is retried by READ_RETRY (test_faults), so it is met by jobs without.
        run("wrong password", "post_collection_validation", url=wrong)
        run("wrong password, FK", "add_execution_id_foreign_key", url=wrong)
        run("unreachable", "rollback_execution_id", rollback(), url=unreachable)
        run("unreachable, collection", "weekly_collection", url=unreachable)
        # A password in run config is refused before a run exists to store it.
        monkeypatch.setenv("RDW_DATABASE_URL", password_url)
        in_config = {"resources": {"target_db": {"config": {"url": password_url}}}}
        refusal = launch_refusal(run_job, "verify_execution_tracking", in_config, instance=instance)
        recorded = everything_recorded(instance, tmp_path)

    # The runs did what they were meant to, so the search below means something.
    for label in (
        "verify",
        "post",
        "indexes",
        "rollback dry run",
        "rollback",
        "restore",
        "collection",
    ):
        assert outcomes[label][0], (label, outcomes[label])
    failed = {label: text for label, (ok, text) in outcomes.items() if not ok}
    assert "orphaned" in failed["fk refused by orphans"]
    assert "expected_rows is 1" in failed["rollback mismatch"]
    for label in ("wrong password", "wrong password, FK"):
        assert "password authentication failed" in failed[label], failed[label]
    for label in ("unreachable", "unreachable, collection"):
        assert "cannot connect to PostgreSQL at" in failed[label], failed[label]
    assert "carries a password" in refusal
    assert len(instance_runs := [k for k in recorded if k.startswith("run record")]) == 13, (
        instance_runs
    )
    compute_logs = [k for k in recorded if k.startswith("file ") and "compute_logs" in k]
    assert compute_logs, sorted(recorded)  # stdout/stderr of the steps were captured

    out, err = capfd.readouterr()
    places = {**recorded, "exception texts": "\n".join(failed.values()) + refusal}
    places |= {"captured stdout": out, "captured stderr": err}
    leaks = [where for where, text in places.items() if PASSWORD in text]
    assert not leaks, f"the password appears in: {leaks}"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://u:{PASSWORD}@db.example:5432/reports?sslmode=bogus",
        f"postgresql://u:{PASSWORD}@db.example:5432/reports?nosuchoption=1",
        f"host=db.example password={PASSWORD} port",
        f"host=db.example password={PASSWORD} sslmode=bogus",
        f"postgresql://u:{PASSWORD}@127.0.0.1:1/reports",
        f"host=127.0.0.1 port=1 user=u password='{PASSWORD}' dbname=reports",
    ],
)
def test_psycopg_errors_carrying_the_dsn_are_redacted(url, monkeypatch):
    """libpq quotes parts of a malformed or failing DSN back; none of it is the password."""
    monkeypatch.setenv("RDW_DATABASE_URL", url)
    with pytest.raises(TargetDatabaseError) as err:
        with TargetDatabase().connect():
            pass
    message = str(err.value)
    assert PASSWORD not in message and PASSWORD not in repr(err.value)
    assert (
        err.value.__cause__ is None
        and err.value.__context__ is None
        or (PASSWORD not in str(err.value.__context__))
    )
