"""What an index should be: `IndexSpec`, the spec's two partial indexes, the opt-in
ones, and the name an index takes on a partition or child table."""

import hashlib
from dataclasses import dataclass

from psycopg import sql

from rdw_tracking.layout import Member
from rdw_tracking.resources import TargetDatabase

EXECUTION_ID_INDEX = "idx_report_data_weeks_execution_id"
COLLECTION_EXECUTION_INDEX = "idx_report_data_weeks_collection_execution"
COMPLETED_AT_INDEX = "idx_workflow_executions_completed_at"
CREATED_AT_INDEX = "idx_report_data_weeks_created_at"
TRACKED = "execution_id IS NOT NULL"


@dataclass(frozen=True)
class IndexSpec:
    """A plain btree index: `name` on `table(columns)`, partial when `predicate` is set.

    `schema` is the table's (and so the index's) schema; None: `target_db.schema_name`.
    A partition may live in another schema than its parent.
    """

    name: str
    table: str
    columns: tuple[str, ...]
    predicate: str | None = None  # SQL text written in this module, never from config
    schema: str | None = None

    def schema_of(self, db: TargetDatabase) -> str:
        return self.schema or db.schema_name

    def where(self, db: TargetDatabase) -> str:
        """`schema.index`, for messages."""
        return f"{self.schema_of(db)}.{self.name}"

    def table_label(self, db: TargetDatabase) -> str:
        return f"{self.schema_of(db)}.{self.table}"

    def _create(self, db: TargetDatabase, template: str) -> sql.Composed:
        statement = sql.SQL(template).format(
            name=sql.Identifier(self.name),
            table=sql.Identifier(self.schema_of(db), self.table),
            columns=sql.SQL(", ").join(map(sql.Identifier, self.columns)),
        )
        if self.predicate:
            statement += sql.SQL(" WHERE ") + sql.SQL(self.predicate)
        return statement

    def create(self, db: TargetDatabase) -> sql.Composed:
        return self._create(db, "CREATE INDEX CONCURRENTLY {name} ON {table} ({columns})")

    def create_on_only(self, db: TargetDatabase) -> sql.Composed:
        """The partitioned parent's index alone: INVALID until every partition's is attached."""
        return self._create(db, "CREATE INDEX {name} ON ONLY {table} ({columns})")

    def attach(self, db: TargetDatabase, partition_index: "IndexSpec") -> sql.Composed:
        return sql.SQL("ALTER INDEX {} ATTACH PARTITION {}").format(
            sql.Identifier(self.schema_of(db), self.name),
            sql.Identifier(partition_index.schema_of(db), partition_index.name),
        )

    def drop(self, db: TargetDatabase) -> sql.Composed:
        return sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
            sql.Identifier(self.schema_of(db), self.name)
        )

    def definition(self, db: TargetDatabase) -> str:
        """How the index reads in `pg_indexes`, for messages."""
        where = f" WHERE ({self.predicate})" if self.predicate else ""
        return (
            f"CREATE INDEX {self.name} ON {self.table_label(db)} "
            f"USING btree ({', '.join(self.columns)}){where}"
        )

    def on_member(self, member: Member) -> "IndexSpec":
        """The same index on one partition or child table, under a name derived from both."""
        return IndexSpec(
            member_index_name(self, member.name),
            member.name,
            self.columns,
            self.predicate,
            member.schema,
        )


def member_index_name(spec: IndexSpec, table: str) -> str:
    """`idx_<partition>_<what>` (`idx_report_data_weeks_p202401_execution_id`): the
    contract's naming, applied to the partition; at most 63 bytes, a short hash of the
    full name keeping two long names apart."""
    prefixes = (f"idx_{spec.table}_", "idx_report_data_weeks_", "idx_")  # any weeks_table
    what = next(spec.name[len(p) :] for p in (*prefixes, "") if spec.name.startswith(p))
    name = f"idx_{table}_{what}"
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.md5(name.encode()).hexdigest()[:8]
    room = 63 - len(f"idx__{digest}_{what}".encode())
    if room < 8:  # a very long `what`: keep the table's start and the hash
        return f"idx_{_truncate(table, 63 - 13)}_{digest}"
    return f"idx_{_truncate(table, room)}_{digest}_{what}"


def _truncate(text: str, max_bytes: int) -> str:
    return text.encode()[:max_bytes].decode(errors="ignore")


def contract_indexes(db: TargetDatabase) -> dict[str, IndexSpec]:
    """The spec's two recommended partial indexes on the weeks table, by name."""
    return {
        EXECUTION_ID_INDEX: IndexSpec(
            EXECUTION_ID_INDEX, db.weeks_table, ("execution_id",), TRACKED
        ),
        COLLECTION_EXECUTION_INDEX: IndexSpec(
            COLLECTION_EXECUTION_INDEX, db.weeks_table, ("collection_id", "execution_id"), TRACKED
        ),
    }


def completed_at_index(db: TargetDatabase) -> IndexSpec:
    """Opt-in: lets the polling sensor find newly completed executions without a scan."""
    return IndexSpec(COMPLETED_AT_INDEX, db.executions_table, ("completed_at",))


def created_at_index(db: TargetDatabase) -> IndexSpec:
    """Opt-in: lets validation read only the days and runs it judges.

    A B-tree on (created_at, execution_id), not BRIN: measured at 5M rows, a day's counts
    took 0.09 ms from it (an index-only scan) and 706 ms from a BRIN, whose block ranges
    each hold rows of many days once rows arrive late or are updated. execution_id as
    the second column lets per-day and per-window counts skip the table.
    """
    return IndexSpec(CREATED_AT_INDEX, db.weeks_table, ("created_at", "execution_id"))
