"""What the foreign key engine reads of the catalog: the schema check's report, by shape.

The report (`rdw_tracking.assets.schema.SchemaReport`, read by `inspect_schema`) belongs
to the asset layer above this one, which an engine may not import; the op reads it and
passes it down. These protocols name the parts the engine relies on.
"""

from collections.abc import Callable, Sequence
from typing import Protocol

from rdw_tracking import catalog
from rdw_tracking.layout import Layout
from rdw_tracking.resources import TargetDatabase


class MemberForeignKey(Protocol):
    """A foreign key from `execution_id` to `workflow_executions(id)` on one table of the
    layout (the table itself, a partition or a child)."""

    @property
    def name(self) -> str: ...

    @property
    def validated(self) -> bool: ...

    @property
    def inherited(self) -> bool: ...  # a partition's copy of its parent's constraint

    @property
    def on_delete(self) -> str: ...


class SchemaReading(Protocol):
    """The weeks table as the catalog has it: its layout, its column, its foreign keys."""

    @property
    def weeks_exists(self) -> bool: ...

    @property
    def executions_exists(self) -> bool: ...

    @property
    def layout(self) -> Layout | None: ...

    @property
    def member_foreign_keys(self) -> Sequence[MemberForeignKey]: ...

    @property
    def execution_id(self) -> catalog.Column | None: ...

    @property
    def foreign_key(self) -> catalog.ForeignKey | None: ...

    def foreign_keys_of(self, oid: int) -> Sequence[MemberForeignKey]: ...


# `inspect_schema`: the catalog read again, as each pass of the run does.
Inspect = Callable[[TargetDatabase], SchemaReading]
