"""The autocommit connections DDL runs on: each statement its own transaction."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg

from rdw_tracking.resources import TargetDatabase


@dataclass(frozen=True)
class Connections:
    """Two autocommit connections reused across the many short steps of one build on a
    partitioned or inheritance table: `work` runs each statement (its own transaction),
    `watch` looks at it meanwhile and asks the catalog between statements."""

    work: psycopg.Connection
    watch: psycopg.Connection


@contextmanager
def connections(db: TargetDatabase) -> Iterator[Connections]:
    """Open the two `Connections` of one build."""
    with db.connect(autocommit=True) as work, db.connect(autocommit=True) as watch:
        yield Connections(work, watch)


@contextmanager
def autocommit(db: TargetDatabase, conn: psycopg.Connection | None) -> Iterator[psycopg.Connection]:
    """`conn` when given (left open), else an autocommit connection of its own."""
    if conn is not None:
        yield conn
    else:
        with db.connect(autocommit=True) as own:
            yield own
