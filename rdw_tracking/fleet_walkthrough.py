"""`rdw-tracking demo --fleet N`: the walkthrough over a fleet of embedded databases.

Builds the databases `rdw_fleet_1` .. `rdw_fleet_N` on the embedded server (the second
in schema `reporting` with the weeks table `report_weeks`, the third range-partitioned
by month), writes their fleet file under the state dir (`.rdw/fleet.yaml`, each URL in
an env var of this process, never in the file), and runs for each database, briefly,
what `make demo` runs for one: the indexes (with both opt-in ones), the
verification, a collection run, both sensors and the validation runs they request.
Every run is a run of one database's partition, in the Dagster instance `make ui` shows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import psycopg
import yaml

from rdw_tracking import demo, embedded, fleet
from rdw_tracking.demo_layouts import relayout
from rdw_tracking.walkthrough import evaluate, sensor_outcome

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
# Both opt-in indexes: per-run verdicts and history read only their rows, and the
# polling sensor reads workflow_executions by completed_at.
OPT_IN = {"report_data_weeks_created_at": True, "workflow_executions_completed_at": True}
INDEXES = {"ops": {"execution_id_indexes": {"config": OPT_IN}}}


@dataclass(frozen=True)
class Member:
    """One demo database of the fleet: its name (database and partition key), the env
    var of its URL, its table names and layout."""

    name: str
    url_env: str
    names: demo.DemoNames = demo.DemoNames()
    layout: str = "ordinary"

    def entry(self) -> dict:
        entry = {"name": self.name, "url_env": self.url_env}
        if self.names.schema != "public":
            entry["schema_name"] = self.names.schema
        if self.names.weeks != "report_data_weeks":
            entry["weeks_table"] = self.names.weeks
        return entry

    @property
    def table(self) -> str:
        return f"{self.names.schema}.{self.names.weeks}"


def members(count: int) -> list[Member]:
    """The demo fleet: the second database in another schema under another table name,
    the third range-partitioned, the others as `make demo` builds its one."""
    found = []
    for i in range(1, count + 1):
        names, layout = demo.DemoNames(), "ordinary"
        if i == 2:
            names = demo.DemoNames(schema="reporting", weeks="report_weeks")
        elif i == 3:
            layout = "range"
        found.append(Member(f"rdw_fleet_{i}", f"RDW_FLEET_URL_{i}", names, layout))
    return found


def fleet_file() -> Path:
    return embedded.state_dir() / "fleet.yaml"


def _has_weeks(url: str, member: Member) -> bool:
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text))",
            [member.names.schema, member.names.weeks],
        )
        return found.fetchone()[0] is not None


def prepare(count: int, rows: int, rebuild: bool = True) -> list[Member]:
    """Build (or with `rebuild=False`, keep when present) the fleet's databases on the
    embedded server, write the fleet file and point this process at it: RDW_FLEET_FILE
    and one URL variable per database, which the UI's processes inherit."""
    fleet_members = members(count)
    for member in fleet_members:
        url = embedded.database_url(member.name)
        os.environ[member.url_env] = url
        if rebuild or not _has_weeks(url, member):
            summary = demo.build(url, demo.DemoShape(rows=rows), member.names)
            relayout(url, member.layout, member.names)
            print(
                f"{member.name}: {summary['rows']:,} rows in {member.table}"
                f"{' (range-partitioned by month)' if member.layout == 'range' else ''}, "
                f"built in {summary['seconds']} s"
            )
    path = fleet_file()
    text = yaml.safe_dump({"databases": [m.entry() for m in fleet_members]}, sort_keys=False)
    path.write_text(
        "# Written by `rdw-tracking demo --fleet`: the demo's databases on the embedded\n"
        "# server; each URL is in the env var named by url_env.\n" + text
    )
    os.environ[fleet.FLEET_ENV] = str(path)
    print(f"fleet file: {path} ({count} databases)")
    return fleet_members


@dataclass
class Runs:
    """What the walkthrough did for one database."""

    member: Member
    results: list[dg.ExecuteInProcessResult]
    sensor_requests: int = 0

    def line(self) -> str:
        ok = sum(r.success for r in self.results)
        checks = [e for r in self.results for e in r.get_asset_check_evaluations()]
        population = {}
        for result in self.results:
            for event in result.get_asset_materialization_events():
                materialization = event.event_specific_data.materialization
                if materialization.asset_key.to_user_string() == "execution_id_population":
                    population = {
                        k: getattr(v, "value", v) for k, v in materialization.metadata.items()
                    }
        rows = population.get("total_rows", "?")
        pct = population.get("population_pct", "?")
        return (
            f"  {self.member.name:<12} {self.member.table:<26} {self.member.layout:<9} "
            f"{rows:>8} {pct:>7}%  runs {ok}/{len(self.results)} succeeded  "
            f"checks {sum(e.passed for e in checks)}/{len(checks)} passed  "
            f"sensor requests {self.sensor_requests}"
        )


def _run(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    job: str,
    database: str,
    run_config: dict | None = None,
    tags: dict | None = None,
) -> dg.ExecuteInProcessResult:
    result = defs.resolve_job_def(job).execute_in_process(
        instance=instance,
        partition_key=database,
        run_config={**QUIET, **(run_config or {})},
        tags=tags,
        raise_on_error=False,
    )
    checks = result.get_asset_check_evaluations()
    trigger = (tags or {}).get("dagster/sensor_name", "demo")
    print(
        f"  {database:<12} {job:<28} {trigger:<27} "
        f"{'succeeded' if result.success else 'FAILED':<10} "
        f"checks {sum(e.passed for e in checks)}/{len(checks)} passed"
    )
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE" and event.event_specific_data.error:
            print(
                f"    step {event.step_key} failed: {event.event_specific_data.error.message.strip()}"
            )
    return result


def _launch(defs, instance, sensor: str, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    """Run what a sensor requested, for its partition, tagged the way the daemon tags it."""
    tags = {**request.tags, "dagster/sensor_name": sensor}
    if request.run_key:
        tags["dagster/run_key"] = request.run_key
    job = request.job_name or defs.resolve_sensor_def(sensor).job_name
    return _run(defs, instance, job, request.partition_key, request.run_config, tags)


def _poll(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None):
    from rdw_tracking.sensors import ExecutionsPolling

    sensor = defs.resolve_sensor_def("workflow_executions_sensor")
    with dg.build_sensor_context(
        cursor=cursor, instance=instance, resources={"executions_polling": ExecutionsPolling()}
    ) as context:
        return evaluate(sensor, context)


def run(count: int, rows: int = 20_000) -> int:
    fleet_members = prepare(count, rows)
    from rdw_tracking import definitions

    defs = definitions.fleet_databases(fleet.load())
    instance = (
        dg.DagsterInstance.get()
        if os.environ.get("DAGSTER_HOME")
        else dg.DagsterInstance.ephemeral()
    )
    runs = {m.name: Runs(m, []) for m in fleet_members}
    # The polling sensor's first tick sets one cursor per database.
    first = _poll(defs, instance, None)
    print(f"\nworkflow_executions_sensor, first tick: {len(first.run_requests)} run request(s)")
    collection_sensor = defs.resolve_sensor_def("collection_run_sensor")
    for member in fleet_members:
        print(f"\n{member.name} ({member.table}, {member.layout})")
        done = runs[member.name].results
        done.append(_run(defs, instance, "create_execution_id_indexes", member.name, INDEXES))
        done.append(_run(defs, instance, "verify_execution_tracking", member.name))
        collection = _run(defs, instance, "weekly_collection", member.name)
        done.append(collection)
        if collection.success:
            context = dg.build_run_status_sensor_context(
                sensor_name=collection_sensor.name,
                dagster_event=collection.get_run_success_event(),
                dagster_instance=instance,
                dagster_run=collection.dagster_run,
            )
            requests, _, _ = sensor_outcome(collection_sensor(context))
            for request in requests:
                runs[member.name].sensor_requests += 1
                done.append(_launch(defs, instance, collection_sensor.name, request))
    # One tick over the whole fleet: a request for each database whose collection completed.
    tick = _poll(defs, instance, first.cursor)
    print(
        f"\nworkflow_executions_sensor: {len(tick.run_requests)} run request(s), one per database"
    )
    for request in tick.run_requests:
        runs[request.partition_key].sensor_requests += 1
        runs[request.partition_key].results.append(
            _launch(defs, instance, "workflow_executions_sensor", request)
        )
    print(
        f"\nsummary\n  {'database':<12} {'weeks table':<26} {'layout':<9} "
        f"{'rows':>8} {'tracked':>8}"
    )
    print("\n".join(r.line() for r in runs.values()))
    failed = [name for name, r in runs.items() if not all(x.success for x in r.results)]
    if failed:
        print(f"\nfailed runs in: {', '.join(failed)}")
        return 1
    print(
        f"\nThe same fleet in the Dagster UI, one partition per database: rdw-tracking ui --fleet {count}"
    )
    return 0
