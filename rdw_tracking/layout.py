"""How `report_data_weeks` is laid out: an ordinary table, a declaratively partitioned
table (range, list, hash, multi-level, DEFAULT partition) or an inheritance parent with
child tables; or something the write jobs refuse (a view, a foreign table, rules).

One catalog query per question. A ctid is unique only inside one physical table, so
every statement that changes rows works on one `leaf` (a table holding rows) at a time,
or identifies rows by `(tableoid, ctid)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import namedtuple_row

# The relkinds a name can have, in words for messages.
KINDS = {
    "r": "ordinary table",
    "p": "partitioned table",
    "v": "view",
    "m": "materialized view",
    "f": "foreign table",
    "S": "sequence",
    "i": "index",
    "I": "partitioned index",
    "c": "composite type",
    "t": "TOAST table",
}
STRATEGIES = {"r": "range", "l": "list", "h": "hash"}


@dataclass(frozen=True)
class Member:
    """One relation of the table's tree: the table itself, a partition, or a child."""

    oid: int
    schema: str
    name: str
    relkind: str
    level: int  # 0: the table itself
    parent_oid: int | None
    bound: str | None  # partition bound, as pg_get_expr prints it
    rules: tuple[str, ...] = ()

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def holds_rows(self) -> bool:
        """A physical table: its own heap, its own ctids."""
        return self.relkind == "r"


@dataclass(frozen=True)
class Layout:
    schema: str
    table: str
    kind: str  # "ordinary", "partitioned", "inheritance", or KINDS[relkind] otherwise
    strategy: str | None  # range, list or hash (the table's own partitioning)
    key: str | None  # the partition key, as pg_get_partkeydef prints it
    members: tuple[Member, ...]  # the table first, then its tree, level by level

    @property
    def root(self) -> Member:
        return self.members[0]

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def leaves(self) -> list[Member]:
        """The physical tables holding the table's rows, each with its own ctids."""
        return [m for m in self.members if m.holds_rows]

    @property
    def partitions(self) -> list[Member]:
        """Every partition or child below the table (any level)."""
        return list(self.members[1:])

    @property
    def is_tree(self) -> bool:
        return self.kind in ("partitioned", "inheritance")

    def refusal(self, job: str) -> str | None:
        """Why `job`, which changes rows or DDL, must not touch this; None when it may."""
        if self.kind not in ("ordinary", "partitioned", "inheritance"):
            return (
                f"{job} refused: {self.label} is a {self.kind}, not a table; nothing was "
                "changed. Set target_db.weeks_table (and target_db.schema_name) to the table "
                "that holds the rows: an ordinary, partitioned or inheritance parent table"
            )
        foreign = [m.label for m in self.members if m.relkind == "f"]
        if foreign:
            return (
                f"{job} refused: {self.label} has foreign-table partitions "
                f"({', '.join(foreign)}), whose rows live on another server; nothing was "
                "changed. Detach them, or run the job on the server that holds them"
            )
        ruled = [f"{m.label} ({', '.join(m.rules)})" for m in self.members if m.rules]
        if ruled:
            return (
                f"{job} refused: {self.label} has rules that rewrite what is written to it: "
                f"{'; '.join(ruled)}; nothing was changed. Rules can send an UPDATE elsewhere: "
                "drop them (DROP RULE ... ON ...) or point target_db.weeks_table at the "
                "table the rows really live in"
            )
        return None

    def describe(self) -> str:
        """One line for logs: `public.report_data_weeks: partitioned (range on created_at),
        24 partitions`."""
        if self.kind == "partitioned":
            leaves = len(self.leaves)
            return (
                f"{self.label}: partitioned ({self.key}), {len(self.partitions)} partitions, "
                f"{leaves} holding rows"
            )
        if self.kind == "inheritance":
            return f"{self.label}: inheritance parent of {len(self.partitions)} child tables"
        return f"{self.label}: {self.kind}"


_TREE = """
WITH RECURSIVE tree AS (
    SELECT c.oid, 0 AS level, NULL::oid AS parent_oid
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = %(schema)s AND c.relname = %(table)s
    UNION ALL
    -- a partition being detached CONCURRENTLY is no longer part of the table
    SELECT i.inhrelid, t.level + 1, i.inhparent
    FROM pg_inherits i JOIN tree t ON i.inhparent = t.oid
    WHERE NOT i.inhdetachpending
)
SELECT t.oid::bigint AS oid, n.nspname AS schema, c.relname AS name, c.relkind::text AS relkind,
       t.level AS level, t.parent_oid::bigint AS parent_oid,
       pg_get_expr(c.relpartbound, c.oid) AS bound,
       CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END AS partkey,
       coalesce((SELECT array_agg(r.rulename::text ORDER BY r.rulename) FROM pg_rewrite r
                 WHERE r.ev_class = c.oid AND r.rulename <> '_RETURN'), '{}') AS rules,
       c.relhassubclass AS has_children
FROM tree t
JOIN pg_class c ON c.oid = t.oid
JOIN pg_namespace n ON n.oid = c.relnamespace
ORDER BY t.level, n.nspname, c.relname
"""


def table_layout(
    conn: psycopg.Connection | psycopg.Cursor, schema: str, table: str
) -> Layout | None:
    """The layout of `schema.table`; None when no relation has that name."""
    connection = conn.connection if isinstance(conn, psycopg.Cursor) else conn
    with connection.cursor(row_factory=namedtuple_row) as by_name:
        rows = by_name.execute(_TREE, {"schema": schema, "table": table}).fetchall()
    if not rows:
        return None
    members = tuple(
        Member(
            oid=int(row.oid),
            schema=row.schema,
            name=row.name,
            relkind=row.relkind,
            level=row.level,
            parent_oid=int(row.parent_oid) if row.parent_oid is not None else None,
            bound=row.bound,
            rules=tuple(row.rules or ()),
        )
        for row in rows
    )
    root = rows[0]
    root_kind, partkey, has_children = root.relkind, root.partkey, root.has_children
    if root_kind == "p":
        kind = "partitioned"
    elif root_kind == "r":
        kind = "inheritance" if len(members) > 1 or has_children else "ordinary"
    else:
        kind = KINDS.get(root_kind, f"relation of kind {root_kind!r}")
    strategy = None
    if partkey:
        strategy = partkey.split(" ", 1)[0].lower()
    return Layout(schema, table, kind, strategy, partkey, members)


# Whether relation `oid` is, right now, a leaf of the tree under `root`: a batch checks this
# after locking the leaf, so a partition detached (or a child un-inherited) meanwhile is
# never touched.
_IS_MEMBER = """
WITH RECURSIVE up AS (
    SELECT %(leaf)s::oid AS oid
    UNION ALL
    SELECT i.inhparent FROM pg_inherits i JOIN up ON i.inhrelid = up.oid
    WHERE NOT i.inhdetachpending
)
SELECT EXISTS (SELECT 1 FROM up WHERE oid = %(root)s::oid)
"""


def is_member(conn: psycopg.Connection, root_oid: int, leaf_oid: int) -> bool:
    """Whether `leaf_oid` belongs (at any level) to the table `root_oid` right now."""
    return bool(conn.execute(_IS_MEMBER, {"root": root_oid, "leaf": leaf_oid}).fetchone()[0])


def member_by_oid(conn: psycopg.Connection, oid: int) -> tuple[str, str] | None:
    """(schema, name) of relation `oid` now: a partition may be renamed mid-run."""
    row = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE c.oid = %s::oid",
        [oid],
    ).fetchone()
    return (row[0], row[1]) if row else None
