"""The demo's `report_data_weeks` laid out as real teams lay it out at size.

`relayout(url, "range")` turns the demo's ordinary table into the same rows in another
layout, keeping its name, columns, defaults, primary key name and `fk_collection_id`:

- `range`: partitioned by month of `created_at`, the latest month in the DEFAULT partition;
- `list`: partitioned by `status`, with a DEFAULT partition;
- `hash`: partitioned by hash of `id`, 4 partitions;
- `multilevel`: by quarter of `created_at`, each quarter by hash of `id` (2), plus DEFAULT;
- `inheritance`: a parent keeping the oldest third of the rows, and two child tables.

Used by the tests (every job on every layout) and the benchmarks; a partitioned table's
primary key must hold its partition key, so it becomes `(id, <key>)` as it would for a team.
"""

from __future__ import annotations

import datetime as dt

import psycopg
from psycopg import sql

from rdw_tracking.demo import DemoNames, mark_tables

LAYOUTS = ("ordinary", "range", "list", "hash", "multilevel", "inheritance")


def _months(first: dt.date, last: dt.date) -> list[dt.date]:
    months, day = [], first.replace(day=1)
    while day <= last:
        months.append(day)
        day = (day.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return months


def _bounds(conn: psycopg.Connection, flat: sql.Identifier) -> tuple[dt.date, dt.date]:
    lo, hi = conn.execute(
        sql.SQL("SELECT min(created_at)::date, max(created_at)::date FROM {}").format(flat)
    ).fetchone()
    today = dt.datetime.now(dt.timezone.utc).date()
    return lo or today, max(hi or today, today)


_KEY = {"range": "created_at", "list": "status", "hash": "id", "multilevel": "created_at"}
_STRATEGY = {"range": "RANGE", "list": "LIST", "hash": "HASH", "multilevel": "RANGE"}


def relayout(
    url: str,
    layout: str,
    names: DemoNames | None = None,
    months_per_partition: int = 1,
) -> None:
    """Rebuild `names.weeks` at `url` in `layout` (one of LAYOUTS), same rows and names."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    names = names or DemoNames()
    if layout == "ordinary":
        return
    with psycopg.connect(url, autocommit=False) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        build = _Relayout(conn, names)
        build.move_aside()
        build.create_parent(layout)
        if layout in ("range", "multilevel"):
            build.range_partitions(layout, months_per_partition)
        elif layout == "list":
            build.list_partitions()
        elif layout == "hash":
            build.hash_partitions()
        build.add_collection_fk()
        if layout == "inheritance":
            build.fill_inheritance()
        else:
            conn.execute(sql.SQL("INSERT INTO {} SELECT * FROM {}").format(build.weeks, build.flat))
        conn.execute(sql.SQL("DROP TABLE {}").format(build.flat))
        mark_tables(conn, names)  # the new table and its partitions are the demo's too
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("ANALYZE {}").format(build.weeks))


class _Relayout:
    """The steps of one relayout, in one transaction: the old table moves aside as
    `<weeks>_flat`, the new one takes its name, its rows are copied over."""

    def __init__(self, conn: psycopg.Connection, names: DemoNames):
        self.conn, self.names = conn, names
        self.weeks = sql.Identifier(names.schema, names.weeks)
        self.flat_name = f"{names.weeks}_flat"[:63]
        self.flat = sql.Identifier(names.schema, self.flat_name)
        self.pkey = sql.Identifier(f"{names.weeks}_pkey")

    def part(self, suffix: str) -> sql.Identifier:
        return sql.Identifier(self.names.schema, f"{self.names.weeks}_{suffix}"[:63])

    def move_aside(self) -> None:
        names, conn = self.names, self.conn
        conn.execute(
            sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                self.weeks, sql.Identifier(self.flat_name)
            )
        )
        conn.execute(
            sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                sql.Identifier(names.schema, f"{names.weeks}_pkey"),
                sql.Identifier(f"{self.flat_name}_pkey"[:63]),
            )
        )
        self.first, self.last = _bounds(conn, self.flat)

    def create_parent(self, layout: str) -> None:
        like = sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(self.weeks, self.flat)
        columns = "(id)"
        if layout == "inheritance":
            self.conn.execute(like)
        else:
            by = sql.SQL(" PARTITION BY {} ({})").format(
                sql.SQL(_STRATEGY[layout]), sql.Identifier(_KEY[layout])
            )
            self.conn.execute(like + by)
            # A partitioned table's primary key must hold its partition key.
            columns = "(id)" if layout == "hash" else f"(id, {_KEY[layout]})"
        self.conn.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY " + columns).format(
                self.weeks, self.pkey
            )
        )

    def range_partitions(self, layout: str, months_per_partition: int) -> None:
        months = _months(self.first, self.last)
        starts = months[:: 3 if layout == "multilevel" else months_per_partition]
        # The latest period goes to the DEFAULT partition: rows land there until a
        # team adds its partition.
        for start, end in zip(starts[:-1], starts[1:], strict=False):
            ident = self.part(f"p{start:%Y%m}")
            sub = " PARTITION BY HASH (id)" if layout == "multilevel" else ""
            self.conn.execute(
                sql.SQL(
                    "CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})" + sub
                ).format(
                    ident,
                    self.weeks,
                    sql.Literal(f"{start}T00:00:00Z"),
                    sql.Literal(f"{end}T00:00:00Z"),
                )
            )
            if layout == "multilevel":
                self.hash_partitions(2, parent=ident, prefix=f"p{start:%Y%m}_")
        self.default_partition()

    def list_partitions(self) -> None:
        for status in ("completed", "failed"):
            self.conn.execute(
                sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES IN ({})").format(
                    self.part(status), self.weeks, sql.Literal(status)
                )
            )
        self.default_partition()

    def hash_partitions(
        self, modulus: int = 4, parent: sql.Identifier | None = None, prefix: str = ""
    ) -> None:
        for remainder in range(modulus):
            self.conn.execute(
                sql.SQL(
                    "CREATE TABLE {} PARTITION OF {} FOR VALUES WITH (MODULUS {}, REMAINDER {})"
                ).format(
                    self.part(f"{prefix}h{remainder}"),
                    parent or self.weeks,
                    sql.Literal(modulus),
                    sql.Literal(remainder),
                )
            )

    def default_partition(self) -> None:
        self.conn.execute(
            sql.SQL("CREATE TABLE {} PARTITION OF {} DEFAULT").format(
                self.part("default"), self.weeks
            )
        )

    def add_collection_fk(self) -> None:
        self.conn.execute(
            sql.SQL(
                "ALTER TABLE {} ADD CONSTRAINT fk_collection_id FOREIGN KEY (collection_id) "
                "REFERENCES {}(id) ON DELETE CASCADE"
            ).format(self.weeks, sql.Identifier(self.names.schema, self.names.collections))
        )

    def fill_inheritance(self) -> None:
        """The parent keeps the oldest third of the rows; two children take the rest."""
        first, last = self.first, self.last
        third = first + (last - first) / 3
        two_thirds = first + 2 * (last - first) / 3
        lower = sql.SQL("created_at IS NULL OR created_at < {}").format(
            sql.Literal(f"{third}T00:00:00Z")
        )
        copy = sql.SQL("INSERT INTO {} SELECT * FROM {} WHERE ")
        self.conn.execute(copy.format(self.weeks, self.flat) + lower)
        for suffix, lo, hi in [("child_1", third, two_thirds), ("child_2", two_thirds, None)]:
            child = self.part(suffix)
            self.conn.execute(sql.SQL("CREATE TABLE {} () INHERITS ({})").format(child, self.weeks))
            self.conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(child))
            where = sql.SQL("created_at >= {}").format(sql.Literal(f"{lo}T00:00:00Z"))
            if hi:
                where += sql.SQL(" AND created_at < {}").format(sql.Literal(f"{hi}T00:00:00Z"))
            self.conn.execute(copy.format(child, self.flat) + where)
