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
    weeks = sql.Identifier(names.schema, names.weeks)
    flat_name = f"{names.weeks}_flat"[:63]
    flat = sql.Identifier(names.schema, flat_name)
    pkey = sql.Identifier(f"{names.weeks}_pkey")
    collections = sql.Identifier(names.schema, names.collections)

    def part(suffix: str) -> tuple[str, sql.Identifier]:
        name = f"{names.weeks}_{suffix}"[:63]
        return name, sql.Identifier(names.schema, name)

    with psycopg.connect(url, autocommit=False) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute(
            sql.SQL("ALTER TABLE {} RENAME TO {}").format(weeks, sql.Identifier(flat_name))
        )
        conn.execute(
            sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                sql.Identifier(names.schema, f"{names.weeks}_pkey"),
                sql.Identifier(f"{flat_name}_pkey"[:63]),
            )
        )
        first, last = _bounds(conn, flat)
        like = sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(weeks, flat)
        key = {"range": "created_at", "list": "status", "hash": "id", "multilevel": "created_at"}
        if layout == "inheritance":
            conn.execute(like)
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY (id)").format(weeks, pkey)
            )
        else:
            strategy = {"range": "RANGE", "list": "LIST", "hash": "HASH", "multilevel": "RANGE"}
            conn.execute(
                like
                + sql.SQL(" PARTITION BY {} ({})").format(
                    sql.SQL(strategy[layout]), sql.Identifier(key[layout])
                )
            )
            columns = "(id)" if layout == "hash" else f"(id, {key[layout]})"
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY " + columns).format(
                    weeks, pkey
                )
            )
        if layout in ("range", "multilevel"):
            months = _months(first, last)
            step = 3 if layout == "multilevel" else months_per_partition
            starts = months[::step]
            # The latest period goes to the DEFAULT partition: rows land there until a
            # team adds its partition.
            for start, end in zip(starts[:-1], starts[1:], strict=False):
                name, ident = part(f"p{start:%Y%m}")
                sub = " PARTITION BY HASH (id)" if layout == "multilevel" else ""
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})" + sub
                    ).format(
                        ident,
                        weeks,
                        sql.Literal(f"{start}T00:00:00Z"),
                        sql.Literal(f"{end}T00:00:00Z"),
                    )
                )
                if layout == "multilevel":
                    for remainder in range(2):
                        _, leaf = part(f"p{start:%Y%m}_h{remainder}")
                        conn.execute(
                            sql.SQL(
                                "CREATE TABLE {} PARTITION OF {} FOR VALUES WITH (MODULUS 2, REMAINDER {})"
                            ).format(leaf, ident, sql.Literal(remainder))
                        )
            _, default = part("default")
            conn.execute(sql.SQL("CREATE TABLE {} PARTITION OF {} DEFAULT").format(default, weeks))
        elif layout == "list":
            for status in ("completed", "failed"):
                _, ident = part(status)
                conn.execute(
                    sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES IN ({})").format(
                        ident, weeks, sql.Literal(status)
                    )
                )
            _, default = part("default")
            conn.execute(sql.SQL("CREATE TABLE {} PARTITION OF {} DEFAULT").format(default, weeks))
        elif layout == "hash":
            for remainder in range(4):
                _, ident = part(f"h{remainder}")
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE {} PARTITION OF {} FOR VALUES WITH (MODULUS 4, REMAINDER {})"
                    ).format(ident, weeks, sql.Literal(remainder))
                )
        conn.execute(
            sql.SQL(
                "ALTER TABLE {} ADD CONSTRAINT fk_collection_id FOREIGN KEY (collection_id) "
                "REFERENCES {}(id) ON DELETE CASCADE"
            ).format(weeks, collections)
        )
        if layout == "inheritance":
            third = first + (last - first) / 3
            two_thirds = first + 2 * (last - first) / 3
            children = [("child_1", third, two_thirds), ("child_2", two_thirds, None)]
            lower = sql.SQL("created_at IS NULL OR created_at < {}").format(
                sql.Literal(f"{third}T00:00:00Z")
            )
            conn.execute(
                sql.SQL("INSERT INTO {} SELECT * FROM {} WHERE ").format(weeks, flat) + lower
            )
            for suffix, lo, hi in children:
                _, child = part(suffix)
                conn.execute(sql.SQL("CREATE TABLE {} () INHERITS ({})").format(child, weeks))
                conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(child))
                where = sql.SQL("created_at >= {}").format(sql.Literal(f"{lo}T00:00:00Z"))
                if hi:
                    where += sql.SQL(" AND created_at < {}").format(sql.Literal(f"{hi}T00:00:00Z"))
                conn.execute(
                    sql.SQL("INSERT INTO {} SELECT * FROM {} WHERE ").format(child, flat) + where
                )
        else:
            conn.execute(sql.SQL("INSERT INTO {} SELECT * FROM {}").format(weeks, flat))
        conn.execute(sql.SQL("DROP TABLE {}").format(flat))
        mark_tables(conn, names)  # the new table and its partitions are the demo's too
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("ANALYZE {}").format(weeks))
