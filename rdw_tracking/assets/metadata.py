"""Table metadata: the one way an asset or check turns rows into a table the UI shows.

Each asset used to spell out `TableSchema(columns=[TableColumn(...), ...])` and a
`TableRecord` per row; here the columns are named once, with their types, and every
record is read by those names, so a table's schema and its records cannot disagree.
"""

from collections.abc import Iterable, Mapping
from typing import Any

import dagster as dg


def metadata_table(
    columns: Mapping[str, str],
    records: Iterable[Mapping[str, Any]],
    descriptions: Mapping[str, str] | None = None,
) -> dg.TableMetadataValue:
    """A metadata table of `columns` (name: Dagster type, in display order), one record
    per mapping in `records` holding a value for each column; `descriptions` annotate
    some columns."""
    described = descriptions or {}
    return dg.MetadataValue.table(
        records=[dg.TableRecord({name: record[name] for name in columns}) for record in records],
        schema=dg.TableSchema(
            columns=[
                dg.TableColumn(name, type_, description=described.get(name))
                for name, type_ in columns.items()
            ]
        ),
    )
