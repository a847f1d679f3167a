"""Demo data: the spec's three tables, filled deterministically on the server.

About a year of weekly rows per collection. Rows created before the tracking cut-over
are legacy rows with a NULL `execution_id`; rows after it carry the id of the
`workflow_executions` row of their collection run, except a few orphaned ids that
point nowhere. Everything is generated with `INSERT ... SELECT generate_series`, so
millions of rows never travel through Python; ids are md5-derived, so two builds of the
same size hold the same rows (only `created_at` moves with the clock).

The demo drops only tables it created: each carries the comment `MARKER`, and a table
of the same name without it (a real `report_data_weeks`) makes `build` refuse before
it drops anything.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row, namedtuple_row
from psycopg.types.numeric import Int8

WEEKS = 52
COLLECTIONS_PER_RUN = 50
MARKER = "rdw_tracking demo table"
DROP_LOCK_TIMEOUT = "5s"  # a demo rebuild never queues behind (and ahead of) real work


class NotDemoTables(RuntimeError):
    """Tables named like the demo's that the demo did not create: never dropped."""


@dataclass(frozen=True)
class DemoShape:
    """The parameters of a demo dataset; `rows` is the size of report_data_weeks."""

    rows: int = 20_000
    weeks: int = WEEKS
    cutover_days: int = 56
    orphan_every: int = 1_000  # about one orphaned execution_id per this many tracked rows
    collections_per_run: int = COLLECTIONS_PER_RUN  # fewer: more workflow_executions

    @property
    def collections(self) -> int:
        return max(1, math.ceil(self.rows / self.weeks))

    @property
    def runs_per_week(self) -> int:
        return max(1, math.ceil(self.collections / self.collections_per_run))


@dataclass(frozen=True)
class DemoNames:
    schema: str = "public"
    weeks: str = "report_data_weeks"
    executions: str = "workflow_executions"
    collections: str = "report_data_collections"

    def ids(self) -> dict[str, sql.Identifier]:
        return {
            "schema": sql.Identifier(self.schema),
            "weeks": sql.Identifier(self.schema, self.weeks),
            "executions": sql.Identifier(self.schema, self.executions),
            "collections": sql.Identifier(self.schema, self.collections),
            "weeks_pkey": sql.Identifier(f"{self.weeks}_pkey"),
        }


# The contract's DDL, verbatim but for the schema-qualified names.
DDL = [
    "CREATE SCHEMA IF NOT EXISTS {schema}",
    """CREATE TABLE {collections} (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        name VARCHAR(255) NOT NULL,
        created_at TIMESTAMPTZ DEFAULT NOW())""",
    """CREATE TABLE {executions} (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        status VARCHAR(50) NOT NULL,
        created_at TIMESTAMPTZ DEFAULT NOW(),
        completed_at TIMESTAMPTZ,
        workflow_name VARCHAR(255))""",
    """CREATE TABLE {weeks} (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        collection_id UUID NOT NULL,
        week_start_date DATE NOT NULL,
        week_end_date DATE NOT NULL,
        status VARCHAR(50) NOT NULL DEFAULT 'pending',
        execution_id UUID,
        data JSONB,
        created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
        updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
        error_message TEXT,
        CONSTRAINT fk_collection_id FOREIGN KEY (collection_id)
            REFERENCES {collections}(id) ON DELETE CASCADE)""",
]

# Row i of report_data_weeks belongs to collection i / weeks and week i % weeks (0 is
# the oldest); rows of a collection spread over the 7 days of their week by c % 7.
_WEEK_ROW = """
    SELECT i, i / %(weeks)s AS c, i %% %(weeks)s AS w,
           now() - make_interval(days => ((%(weeks)s - 1 - i %% %(weeks)s) * 7 + (i / %(weeks)s) %% 7)::int,
                                 hours => ((i / %(weeks)s) %% 23 + 1)::int,
                                 mins => ((i / %(weeks)s) %% 59)::int) AS created_at
    FROM generate_series(%(lo)s, %(hi)s - 1) AS i
"""

FILL_WEEKS = """
INSERT INTO {weeks} (id, collection_id, week_start_date, week_end_date, status,
                     execution_id, data, created_at, updated_at, error_message)
SELECT md5('rdw-week:' || r.i)::uuid,
       md5('rdw-collection:' || r.c)::uuid,
       date_trunc('week', r.created_at - interval '7 days')::date,
       date_trunc('week', r.created_at - interval '7 days')::date + 6,
       CASE WHEN r.i %% 97 = 0 THEN 'failed' ELSE 'completed' END,
       CASE WHEN r.created_at < now() - make_interval(days => %(cutover_days)s::int) THEN NULL
            -- a multiplicative hash spreads the orphans over all weeks and collections
            WHEN (r.i * 2654435761) %% %(orphan_every)s = 7
                THEN md5('rdw-orphan:' || r.i)::uuid
            ELSE md5('rdw-exec:' || (r.w * %(runs)s + r.c / %(per_run)s))::uuid END,
       jsonb_build_object(
           'collection', r.c, 'week', r.w, 'source', 'report-collector',
           'metrics', jsonb_build_object(
               'impressions', (r.i * 7919) %% 1000000, 'clicks', (r.i * 104729) %% 50000,
               'conversions', (r.i * 31) %% 900, 'spend', round(((r.i * 13) %% 100000) / 100.0, 2),
               'ctr', round(((r.i * 17) %% 1000) / 10000.0, 4)),
           'dimensions', jsonb_build_array('region-' || r.c %% 12, 'channel-' || r.i %% 5,
                                           'device-' || r.i %% 3),
           'currency', 'EUR', 'collector_version', '2.' || r.w %% 4 || '.0'),
       r.created_at,
       r.created_at,
       CASE WHEN r.i %% 97 = 0 THEN 'upstream API returned 503 for week ' || r.w END
FROM ({week_row}) AS r
"""

FILL_COLLECTIONS = """
INSERT INTO {collections} (id, name, created_at)
SELECT md5('rdw-collection:' || c)::uuid, 'collection ' || c,
       now() - make_interval(days => (%(weeks)s * 7 + 1)::int)
FROM generate_series(0, %(collections)s - 1) AS c
"""

# One workflow execution per collection run: a run covers up to 50 collections of a week.
FILL_EXECUTIONS = """
INSERT INTO {executions} (id, status, created_at, completed_at, workflow_name)
SELECT md5('rdw-exec:' || n)::uuid,
       CASE WHEN n %% 211 = 0 THEN 'failed' ELSE 'completed' END,
       now() - make_interval(days => ((%(weeks)s - 1 - n / %(runs)s) * 7 + 7)::int),
       now() - make_interval(days => ((%(weeks)s - 1 - n / %(runs)s) * 7)::int, hours => 1),
       'weekly_collection'
FROM generate_series(0, %(weeks)s * %(runs)s - 1) AS n
"""


def _ddl(statement: str, names: DemoNames) -> sql.Composed:
    return sql.SQL(statement).format(**names.ids())


# The demo's tables in `schema` and every partition or child table below them, with
# their comments: what a rebuild would drop.
DEMO_RELATIONS = """
WITH RECURSIVE tree AS (
    SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s)
    UNION
    SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.oid
)
SELECT n.nspname AS schema, c.relname AS name, c.relkind::text AS relkind,
       obj_description(c.oid, 'pg_class') AS comment
FROM tree JOIN pg_class c ON c.oid = tree.oid JOIN pg_namespace n ON n.oid = c.relnamespace
ORDER BY c.oid
"""


# What `build` reports having written.
COUNTS_SQL = """
SELECT (SELECT count(*) FROM {weeks}) AS rows,
       (SELECT count(execution_id) FROM {weeks}) AS with_execution_id,
       (SELECT count(*) FROM {executions}) AS workflow_executions,
       (SELECT count(*) FROM {collections}) AS collections
"""


def _demo_relations(conn: psycopg.Connection, names: DemoNames) -> list:
    """Named tuples (schema, name, relkind, comment) of DEMO_RELATIONS."""
    tables = [names.weeks, names.executions, names.collections]
    with conn.cursor(row_factory=namedtuple_row) as by_name:
        return by_name.execute(
            DEMO_RELATIONS, {"schema": names.schema, "tables": tables}
        ).fetchall()


def mark_tables(conn: psycopg.Connection, names: DemoNames = DemoNames()) -> None:
    """Mark the demo's tables (and their partitions or children) as the demo's own."""
    for relation in _demo_relations(conn, names):
        conn.execute(
            sql.SQL("COMMENT ON TABLE {} IS {}").format(
                sql.Identifier(relation.schema, relation.name), sql.Literal(MARKER)
            )
        )


def drop_tables(conn: psycopg.Connection, names: DemoNames = DemoNames()) -> None:
    """Drop the demo's tables, but only if every one of them (partitions and children
    included) carries the demo's mark; otherwise refuse, dropping nothing.

    No CASCADE: an object someone else built on them (a view, a foreign key) makes the
    drop fail rather than vanish with it. The check and the drop are one transaction,
    and a lock held elsewhere is waited for at most DROP_LOCK_TIMEOUT.
    """
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(DROP_LOCK_TIMEOUT)))
        found = _demo_relations(conn, names)
        foreign = [f"{r.schema}.{r.name}" for r in found if r.comment != MARKER]
        if foreign:
            raise NotDemoTables(
                f"{', '.join(foreign)} exist(s) but the rdw_tracking demo did not create "
                f"them (no {MARKER!r} comment), so the demo refuses to drop them and changed "
                "nothing; point RDW_DEMO_DATABASE_URL at a database of its own (or unset it "
                "for the embedded server)"
            )
        # Partitions go with their parent; children of an inheritance parent are named.
        kept = [sql.Identifier(r.schema, r.name) for r in found if r.relkind in ("r", "p", "f")]
        if kept:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.SQL(", ").join(kept)))


def create_tables(conn: psycopg.Connection, names: DemoNames = DemoNames()) -> None:
    """The spec's three tables, empty, exactly as the contract writes them (and marked
    as the demo's, so that only they are ever dropped by a rebuild)."""
    for statement in DDL:
        conn.execute(_ddl(statement, names))
    mark_tables(conn, names)


def build(
    url: str,
    shape: DemoShape = DemoShape(),
    names: DemoNames = DemoNames(),
    workers: int = 2,
) -> dict[str, Any]:
    """Drop and rebuild the demo tables at `url`; returns counts and seconds taken.

    Like a restore, the bulk load runs with the primary key and `fk_collection_id`
    dropped and adds them back afterwards (same names, same definitions): building an
    index once is far cheaper than maintaining it over millions of random UUIDs.
    `workers` connections fill disjoint slices of the table in parallel.
    """
    started = time.monotonic()
    # Int8: psycopg would send small numbers as int2 and products of them overflow.
    params = {
        "weeks": Int8(shape.weeks),
        "cutover_days": Int8(shape.cutover_days),
        "orphan_every": Int8(shape.orphan_every),
        "runs": Int8(shape.runs_per_week),
        "per_run": Int8(shape.collections_per_run),
        "collections": Int8(shape.collections),
    }
    _create_without_keys(url, names, params)
    _fill_weeks(url, shape, names, params, workers)
    return _add_keys_back(url, names) | {"seconds": round(time.monotonic() - started, 2)}


def _create_without_keys(url: str, names: DemoNames, params: dict[str, Int8]) -> None:
    """Fresh tables with collections and executions filled, and report_data_weeks
    without its primary key and foreign key for the bulk load."""
    ids = names.ids()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        drop_tables(conn, names)
        create_tables(conn, names)
        conn.execute(sql.SQL(FILL_COLLECTIONS).format(**ids), params)
        conn.execute(sql.SQL(FILL_EXECUTIONS).format(**ids), params)
        conn.execute(
            sql.SQL(
                "ALTER TABLE {weeks} DROP CONSTRAINT fk_collection_id, DROP CONSTRAINT {weeks_pkey}"
            ).format(**ids)
        )


def _add_keys_back(url: str, names: DemoNames) -> dict[str, int]:
    """The primary key and `fk_collection_id` back, statistics fresh; the tables' counts."""
    ids = names.ids()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute(
            sql.SQL(
                "ALTER TABLE {weeks} ADD CONSTRAINT {weeks_pkey} PRIMARY KEY (id), "
                "ADD CONSTRAINT fk_collection_id FOREIGN KEY (collection_id) "
                "REFERENCES {collections}(id) ON DELETE CASCADE"
            ).format(**ids)
        )
        for table in ("collections", "executions", "weeks"):
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(ids[table]))
        with conn.cursor(row_factory=dict_row) as by_name:
            return by_name.execute(sql.SQL(COUNTS_SQL).format(**ids)).fetchone()


def _fill_weeks(url: str, shape: DemoShape, names: DemoNames, params: dict, workers: int) -> None:
    from concurrent.futures import ThreadPoolExecutor
    from itertools import pairwise

    statement = sql.SQL(FILL_WEEKS).format(week_row=sql.SQL(_WEEK_ROW), **names.ids())
    bounds = [shape.rows * k // workers for k in range(workers + 1)]

    def fill(lo: int, hi: int) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SET TimeZone = 'UTC'")
            conn.execute("SET synchronous_commit = off")
            conn.execute(statement, {**params, "lo": Int8(lo), "hi": Int8(hi)})

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(fill, lo, hi) for lo, hi in pairwise(bounds)]:
            future.result()
