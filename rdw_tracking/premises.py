"""What a figure may rest on besides counting it: PostgreSQL's own proof that no orphan
exists (a validated foreign key), and the activity counters with every premise they need.

A validated foreign key from `execution_id` to `workflow_executions(id)` on every
physical table, with its triggers enabled, is PostgreSQL's guarantee that no orphan
exists: `orphan_proof` finds it with one catalog query, and the orphan count is then 0
without a scan.

The counters of `pg_stat_all_tables` are a hint, never a proof. They are kept per server
(a streaming standby counts nothing it replays), reach the statistics up to seconds after
a commit (a long procedure's only when it ends), are not kept by a session with
`track_counts = off`, and a HOT update is invisible to `n_tup_upd - n_tup_hot_upd`: it
is ruled out only for a column some non-summarizing index covers. So they are used only
under an opt-in budget (`count_budget_hours`), and only when every premise below holds,
each checked at run time (`read_hints`, `why_not_reuse`):

- the server is not in recovery (a standby);
- `track_counts` is on, and no role or database setting turns it off;
- every physical table has a non-summarizing index covering `execution_id` and one
  covering `created_at` (BRIN is summarizing from PostgreSQL 16 on: it does not stop HOT);
- the counters are read before the snapshot they vouch for;
- the same server run, statistics and physical tables as the earlier count (no restart,
  reset, TRUNCATE, rewrite, attach or detach).

Nothing here imports Dagster.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from rdw_tracking.layout import Layout

# -- the orphan proof ---------------------------------------------------------------------

# For each physical table (or foreign partition), a validated FK from execution_id alone
# to workflow_executions(id) whose triggers, and those of the constraints it was cloned
# from (the referenced side's triggers belong to the partitioned parent's), all fire.
PROOF_SQL = """
WITH RECURSIVE fk AS (
    SELECT con.oid, con.conrelid AS leaf, con.conname, con.conparentid
    FROM pg_constraint con
    JOIN pg_attribute sa ON sa.attrelid = con.conrelid AND sa.attnum = con.conkey[1]
    JOIN pg_attribute da ON da.attrelid = con.confrelid AND da.attnum = con.confkey[1]
    WHERE con.contype = 'f' AND con.convalidated AND con.conrelid = ANY(%(leaves)s::oid[])
      AND con.confrelid = to_regclass(%(executions)s) AND cardinality(con.conkey) = 1
      AND sa.attname = 'execution_id' AND da.attname = 'id'
    UNION ALL
    SELECT p.oid, fk.leaf, fk.conname, p.conparentid
    FROM pg_constraint p JOIN fk ON p.oid = fk.conparentid
), judged AS (
    SELECT fk.leaf, fk.conname,
           bool_and(NOT EXISTS (SELECT 1 FROM pg_trigger t
                                WHERE t.tgconstraint = fk.oid AND t.tgenabled NOT IN ('O', 'A')))
             AS enforced,
           count(*) FILTER (WHERE EXISTS (SELECT 1 FROM pg_trigger t
                                          WHERE t.tgconstraint = fk.oid)) > 0 AS has_triggers
    FROM fk GROUP BY fk.leaf, fk.conname
)
SELECT l.oid AS leaf,
       (SELECT min(j.conname) FROM judged j
        WHERE j.leaf = l.oid AND j.enforced AND j.has_triggers) AS constraint_name
FROM unnest(%(leaves)s::oid[]) AS l(oid)
"""


def orphan_proof(cur: psycopg.Cursor, layout: Layout, executions: sql.Identifier) -> str | None:
    """The foreign key that proves no orphaned execution_id exists, in words; None when
    some table holding rows has no validated, enforced one."""
    tables = [m for m in layout.members if m.relkind in ("r", "f")]
    params = {"leaves": [m.oid for m in tables], "executions": executions.as_string(cur)}
    found = dict(cur.execute(PROOF_SQL, params).fetchall())
    if not tables or any(found.get(m.oid) is None for m in tables):
        return None
    names = sorted(set(found.values()))
    where = (
        layout.label if len(tables) == 1 else f"each of the {len(tables)} tables of {layout.label}"
    )
    return (
        f"validated foreign key {', '.join(names)} on {where} (triggers enabled): "
        "PostgreSQL refuses any execution_id without its workflow_executions row"
    )


# -- the counters and their premises ----------------------------------------------------------


@dataclass(frozen=True)
class Counters:
    """What the statistics say happened to the weeks table (summed over its leaves)."""

    inserted: int = 0
    moved: int = 0  # non-HOT updates: may have changed created_at or execution_id
    deleted: int = 0


@dataclass(frozen=True)
class Hints:
    """The counters read before a snapshot, and why they cannot be used, if they cannot."""

    counters: Counters
    problem: str | None
    leaves: tuple[int, ...] = ()  # the physical tables they were read for


COUNTERS_SQL = """
SELECT coalesce(sum(s.n_tup_ins), 0)::bigint AS inserted,
       coalesce(sum(s.n_tup_upd - s.n_tup_hot_upd), 0)::bigint AS moved,
       coalesce(sum(s.n_tup_del), 0)::bigint AS deleted
FROM pg_stat_all_tables s WHERE s.relid = ANY(%(leaves)s::oid[])
"""
# Where the counters come from: a standby counts nothing it replays; a server, database
# or role with track_counts off counts nothing of its sessions' writes.
SERVER_SQL = """
SELECT pg_is_in_recovery() AS standby, current_setting('track_counts') AS track_counts,
       ARRAY(SELECT coalesce(r.rolname, 'every role') || ' in '
                    || coalesce(d.datname, 'every database')
             FROM pg_db_role_setting s
             LEFT JOIN pg_roles r ON r.oid = s.setrole
             LEFT JOIN pg_database d ON d.oid = s.setdatabase
             WHERE (s.setdatabase = 0 OR d.datname = current_database())
               AND EXISTS (SELECT 1 FROM unnest(s.setconfig) AS c
                           WHERE lower(replace(c, ' ', '')) IN
                                 ('track_counts=off', 'track_counts=false', 'track_counts=0',
                                  'track_counts=no'))
             ORDER BY 1) AS counts_off
"""
# Leaves where an update of the column can be HOT: no valid non-summarizing index covers
# it (in its key, expressions or predicate). BRIN summarizes from PostgreSQL 16 on.
UNCOVERED_SQL = """
SELECT c.oid::regclass::text FROM unnest(%(leaves)s::oid[]) AS l(oid)
JOIN pg_class c ON c.oid = l.oid
WHERE NOT EXISTS (
    SELECT 1 FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
    JOIN pg_am am ON am.oid = ic.relam
    WHERE i.indrelid = l.oid AND i.indisvalid AND i.indisready
      AND am.amname IN ('btree', 'hash', 'gist', 'gin', 'spgist', %(brin)s)
      AND (%(column)s = ANY(SELECT a.attname FROM pg_attribute a
                            WHERE a.attrelid = l.oid AND a.attnum = ANY(i.indkey::int2[]))
           OR pg_get_expr(i.indexprs, i.indrelid) ~ ('\\m' || %(column)s || '\\M')
           OR pg_get_expr(i.indpred, i.indrelid) ~ ('\\m' || %(column)s || '\\M')))
ORDER BY 1
"""
BRIN_SUMMARIZES = 160000


def read_hints(cur: psycopg.Cursor, leaves: list[int]) -> Hints:
    """The counters, read now (before the snapshot they are to vouch for), with the first
    premise that fails, in words."""
    cur.execute("SELECT pg_stat_clear_snapshot()")  # fresh figures, not a cached snapshot
    with cur.connection.cursor(row_factory=class_row(Counters)) as by_name:
        counters = by_name.execute(COUNTERS_SQL, {"leaves": leaves}).fetchone()
    standby, track_counts, counts_off = cur.execute(SERVER_SQL).fetchone()
    if standby:
        problem = "this server is a standby: its counters do not see the primary's writes"
    elif track_counts != "on":
        problem = "track_counts is off on this server: writes are not counted"
    elif counts_off:
        problem = (
            f"track_counts is turned off for {', '.join(counts_off)}: their writes are not counted"
        )
    else:
        problem = _hot_problem(cur, leaves)
    return Hints(counters, problem, tuple(leaves))


def _hot_problem(cur: psycopg.Cursor, leaves: list[int]) -> str | None:
    brin = "" if cur.connection.info.server_version >= BRIN_SUMMARIZES else "brin"
    for column in ("execution_id", "created_at"):
        params = {"leaves": leaves, "column": column, "brin": brin}
        uncovered = [row[0] for row in cur.execute(UNCOVERED_SQL, params).fetchall()]
        if uncovered:
            where = ", ".join(uncovered[:5]) + (" ..." if len(uncovered) > 5 else "")
            return (
                f"no non-summarizing index covers {column} on {where}: an update of it can "
                "be HOT, which the counters do not tell from others (build "
                "idx_report_data_weeks_execution_id and idx_report_data_weeks_created_at)"
            )
    return None


# What must stay the same for counters to be compared: the server run, the statistics,
# and each physical table (a TRUNCATE or rewrite gives it a new file; attach and detach
# change the set).
EPOCH_SQL = """
SELECT pg_postmaster_start_time()::text AS started,
       (SELECT stats_reset::text FROM pg_stat_database WHERE datname = current_database())
         AS stats_reset,
       ARRAY(SELECT oid::text || ':' || pg_relation_filenode(oid)::text
             FROM unnest(%(relations)s::oid[]) AS oid ORDER BY 1) AS filenodes
"""


def epoch(cur: psycopg.Cursor, leaves: list[int]) -> list:
    started, reset, filenodes = cur.execute(EPOCH_SQL, {"relations": leaves}).fetchone()
    return [started, reset, list(filenodes)]


def why_not_reuse(
    hints: Hints, before: Counters | None, before_epoch: list, now_epoch: list
) -> str | None:
    """Why days counted earlier cannot stand in for a count now; None: nothing says they
    changed (the inserts are balanced by the caller)."""
    if hints.problem:
        return hints.problem
    if before is None:
        return "the last tally kept no counters"
    if before_epoch != now_epoch:
        return (
            "the server restarted, its statistics were reset, or a table was truncated, "
            "rewritten, attached or detached since the last tally"
        )
    now = hints.counters
    if now.inserted < before.inserted:
        return "the statistics of the weeks table were reset since the last tally"
    if now.moved != before.moved or now.deleted != before.deleted:
        changed = (now.moved - before.moved) + (now.deleted - before.deleted)
        return f"{changed} row(s) were updated or deleted since the last tally"
    return None
