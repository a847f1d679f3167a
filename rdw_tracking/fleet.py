"""The fleet file: the reporting databases one deployment looks after, read from
`RDW_FLEET_FILE`.

A plain module (no Dagster): the definitions, the CLI and the benchmarks all read the
file through `load()`. The file names each database and the env var holding its URL,
never a URL or a password, so it can sit in version control and in a container image:

    databases:
      - name: eu              # partition key: [a-z0-9_]+, unique
        url_env: RDW_URL_EU   # env var holding the libpq URI
        schema_name: public   # optional: any target_db field except url
      - name: us
        url_env: RDW_URL_US
        weeks_table: report_weeks

Every refusal is one sentence naming the file, the entry (index and name) and the fix;
none quotes a value that could be a URL or a password.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

FLEET_ENV = "RDW_FLEET_FILE"
# The run tag naming a run's fleet database, and the partition dimension of the databases.
DATABASE_TAG = "rdw/database"
# The run queue's tags (dagster.yaml): one write per value, two reads per value. In a
# fleet each value is the run's database; for one database the write tag reads `true`.
DB_WRITES_TAG = "rdw/db-writes"
READS_TAG = "rdw/reads"
DIMENSION = "database"
NAME_PATTERN = re.compile(r"[a-z0-9_]+")
# `TargetDatabase`'s fields, less `url` (which never sits in the file) and `fleet_name`
# (the entry's `name`), with their types.
# test_fleet.py checks this against the resource, so a new field is not forgotten here.
TARGET_DB_FIELDS: Mapping[str, type] = MappingProxyType(
    {
        "schema_name": str,
        "weeks_table": str,
        "executions_table": str,
        "collections_table": str,
        "statement_timeout_ms": int,
        "lock_timeout_ms": int,
        "idle_in_transaction_timeout_ms": int,
    }
)
_ENTRY_KEYS = ("name", "url_env")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class FleetFileError(ValueError):
    """The fleet file cannot be used; the message names the entry and the fix."""


@dataclass(frozen=True)
class FleetDatabase:
    """One database of the fleet: its partition key, the env var of its URL and the
    `target_db` fields that differ from the defaults."""

    name: str
    url_env: str
    # Read-only; left out of the hash (a mapping has none), kept in equality.
    target_db: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def url(self) -> str:
        """The libpq URI from the environment; never logged, never in an error."""
        value = os.environ.get(self.url_env, "").strip()
        if not value:
            raise FleetFileError(
                f"fleet database {self.name!r}: env {self.url_env} is not set (or empty); "
                "set it to the libpq URI of that database where the code runs"
            )
        return value

    def resource_config(self) -> dict[str, Any]:
        """`target_db` config for this database: its own fields, and the URL."""
        return {**self.target_db, "url": self.url()}


@dataclass(frozen=True)
class Fleet:
    """The databases of the fleet file, in the file's order."""

    path: Path
    databases: tuple[FleetDatabase, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(db.name for db in self.databases)

    def get(self, name: str) -> FleetDatabase:
        for db in self.databases:
            if db.name == name:
                return db
        raise FleetFileError(
            f"fleet file {self.path}: no database named {name!r}; "
            f"the fleet has {', '.join(self.names)}"
        )


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML would
    silently keep the last: two `url_env:` lines would pick a database by accident)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None):
    """The fleet of `path` (default: env `RDW_FLEET_FILE`); None when no fleet file is
    named, which means the single database of `RDW_DATABASE_URL`, as before.

    Every entry's env var must be set in `environ` (default: this process's): a missing
    one is refused here, when the definitions load, not in the middle of a run.
    """
    environ = os.environ if environ is None else environ
    if path is None:
        path = environ.get(FLEET_ENV) or None
        if path is None:
            return None
    return parse(Path(path), _read(Path(path)), environ)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FleetFileError(
            f"fleet file {path} does not exist; fix {FLEET_ENV} or unset it to look after "
            "the single database of RDW_DATABASE_URL"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise FleetFileError(
            f"fleet file {path} cannot be read ({reason}); make it a readable UTF-8 YAML "
            f"file or point {FLEET_ENV} elsewhere"
        ) from None


def parse(path: Path, text: str, environ: Mapping[str, str]) -> Fleet:
    """The fleet in `text` (the contents of `path`), checked entry by entry."""
    where = f"fleet file {path}"
    try:
        document = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        # Problem and position only: PyYAML's own message quotes the offending line,
        # which may be a URL someone pasted.
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or "not valid YAML"
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise FleetFileError(f"{where} is not valid YAML ({problem}{at}); fix that line") from None
    if not isinstance(document, dict):
        raise FleetFileError(
            f"{where} must be a YAML mapping with a `databases:` list, not {_kind(document)}"
        )
    extra = sorted(str(key) for key in document if key != "databases")
    if extra:
        raise FleetFileError(
            f"{where} has unknown top-level key(s) {', '.join(extra)}; the only one is `databases:`"
        )
    entries = document.get("databases")
    if entries is None:
        raise FleetFileError(
            f"{where} has no `databases:` list; add one entry per database "
            f"(name and url_env), or unset {FLEET_ENV}"
        )
    if not isinstance(entries, list):
        raise FleetFileError(
            f"{where}: `databases` must be a list of entries, not {_kind(entries)}"
        )
    if not entries:
        raise FleetFileError(
            f"{where}: `databases` is empty; add at least one entry (name and url_env), or "
            f"unset {FLEET_ENV} to look after the single database of RDW_DATABASE_URL"
        )
    databases: list[FleetDatabase] = []
    first_index: dict[str, int] = {}
    for index, entry in enumerate(entries):
        db = _entry(where, index, entry, environ)
        if db.name in first_index:
            raise FleetFileError(
                f"{where}: databases[{index}] ({db.name!r}) has the same name as "
                f"databases[{first_index[db.name]}]; give each database its own name"
            )
        first_index[db.name] = index
        databases.append(db)
    return Fleet(path=path, databases=tuple(databases))


def _entry(where: str, index: int, entry: Any, environ: Mapping[str, str]) -> FleetDatabase:
    if not isinstance(entry, dict):
        raise FleetFileError(
            f"{where}: databases[{index}] must be a mapping with name and url_env, not "
            f"{_kind(entry)}"
        )
    name = entry.get("name")
    # Quoted only once known to be a well-formed name: a refused value is never echoed.
    label = f"databases[{index}] ({name!r})" if _is_name(name) else f"databases[{index}]"
    if "url" in entry:
        raise FleetFileError(
            f"{where}: {label} has a `url` key, and the file must never hold a URL or a "
            "password; remove it and name the env var holding the URL in `url_env`"
        )
    if name is None:
        raise FleetFileError(
            f"{where}: {label} has no `name`; add a short name of [a-z0-9_]+ (the "
            "database's partition key)"
        )
    if not _is_name(name):
        raise FleetFileError(
            f"{where}: {label} has a `name` that is not [a-z0-9_]+ (lowercase letters, "
            "digits, underscore); rename it, e.g. eu_west"
        )
    unknown = sorted(str(key) for key in entry if key not in _ENTRY_KEYS + tuple(TARGET_DB_FIELDS))
    if unknown:
        raise FleetFileError(
            f"{where}: {label} has unknown field(s) {', '.join(unknown)}; the fields are "
            f"name, url_env and {', '.join(TARGET_DB_FIELDS)}"
        )
    url_env = _url_env(where, label, entry)
    target_db = _target_db_fields(where, label, entry)
    if not environ.get(url_env, "").strip():
        raise FleetFileError(
            f"{where}: {label} names env {url_env}, which is not set (or empty); set it to "
            "the database's libpq URI where the code runs, or remove the entry"
        )
    return FleetDatabase(name=name, url_env=url_env, target_db=MappingProxyType(target_db))


def _url_env(where: str, label: str, entry: dict) -> str:
    url_env = entry.get("url_env")
    if url_env is None:
        raise FleetFileError(
            f"{where}: {label} has no `url_env`; add the name of the env var that holds "
            "its libpq URI"
        )
    if not isinstance(url_env, str) or not _ENV_NAME.fullmatch(url_env):
        raise FleetFileError(
            f"{where}: {label} has a `url_env` that is not an env var name (letters, "
            "digits, underscore); put the variable's name there, never the URL itself"
        )
    return url_env


def _target_db_fields(where: str, label: str, entry: dict) -> dict[str, Any]:
    target_db: dict[str, Any] = {}
    for key, expected in TARGET_DB_FIELDS.items():
        if key not in entry:
            continue
        value = entry[key]
        # bool is an int to Python, never a timeout to a person.
        if not isinstance(value, expected) or isinstance(value, bool):
            raise FleetFileError(
                f"{where}: {label} field {key} must be {_KINDS[expected]}, not "
                f"{_kind(value)}; fix its value"
            )
        if expected is str and not value.strip():
            raise FleetFileError(f"{where}: {label} field {key} is empty; name it or remove it")
        target_db[key] = value
    return target_db


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None


_KINDS = {
    dict: "a mapping",
    list: "a list",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "an empty value",
}


def _kind(value: Any) -> str:
    """What a YAML value is, in words: "a list", "an empty value"."""
    return _KINDS.get(type(value), f"a {type(value).__name__}")


class RunDatabaseError(ValueError):
    """A fleet run whose tags name another database than its partition: refused before
    it touches anything; the message names both values."""


def database_of(tags: Mapping[str, str]) -> str | None:
    """The fleet database a run is for: its partition's, the only source. None if the
    run has no partition.

    Tags are editable in the Launchpad and through GraphQL, so `rdw/database`,
    `rdw/reads` and `rdw/db-writes` only have to agree with the partition: one naming
    another database raises RunDatabaseError (the run would be recorded, and queued,
    as one database while it reads or writes another).
    """
    name = partition_database(tags)
    if name is None:
        return None
    for tag in (DATABASE_TAG, READS_TAG, DB_WRITES_TAG):
        value = tags.get(tag)
        if value is not None and value != name:
            raise RunDatabaseError(
                f"this run's tag {tag}={value!r} disagrees with its partition {name!r}, and a "
                "fleet run's database is its partition alone; launch it for the partition of "
                "the database you mean, without editing the rdw/ tags"
            )
    return name


def partition_database(tags: Mapping[str, str]) -> str | None:
    """The `database` key of a run's partition (or partition range); None if it has none.
    A range over two databases, or a dimension tag disagreeing with the key, is refused."""
    found = {}
    for tag in (
        f"dagster/partition/{DIMENSION}",
        "dagster/partition",
        "dagster/asset_partition_range_start",
        "dagster/asset_partition_range_end",
    ):
        if tags.get(tag):
            # A database x day key reads `<database>|<day>` (dimensions in name order).
            found[tag] = tags[tag].split("|")[0]
    names = sorted(set(found.values()))
    if len(names) > 1:
        first, second = names[:2]
        raise RunDatabaseError(
            f"this run's partition tags name two databases, {first!r} and {second!r}; launch "
            "one run per database, each for its own partition"
        )
    return names[0] if names else None
