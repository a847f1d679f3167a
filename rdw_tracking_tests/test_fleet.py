"""The fleet file: a good one loads; each kind of bad one is refused in one sentence
that names the entry and the fix, and never quotes a URL or a password."""

from __future__ import annotations

import textwrap

import pytest

from rdw_tracking import fleet
from rdw_tracking.fleet import Fleet, FleetDatabase, FleetFileError

SECRET_URL = "postgresql://rdw:hunter22@db.example.internal:5432/reports"
ENV = {"RDW_URL_EU": SECRET_URL, "RDW_URL_US": "postgresql://rdw@us.example/reports"}


def write(tmp_path, text: str):
    path = tmp_path / "fleet.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def refusal(tmp_path, text: str, environ: dict | None = None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(FleetFileError) as err:
        fleet.load(path, environ=ENV if environ is None else environ)
    message = str(err.value)
    # One sentence, naming the file; nothing of a URL or password.
    assert str(path) in message
    assert message.count("\n") == 0 and "hunter22" not in message and "://" not in message
    return message


def test_unset_env_means_no_fleet():
    assert fleet.load(environ={}) is None
    assert fleet.load(environ={fleet.FLEET_ENV: ""}) is None


def test_a_good_file(tmp_path):
    path = write(
        tmp_path,
        """
        databases:
          - name: eu              # partition key
            url_env: RDW_URL_EU
            schema_name: reporting
            statement_timeout_ms: 60000
          - name: us
            url_env: RDW_URL_US
            weeks_table: report_weeks
        """,
    )
    loaded = fleet.load(environ={**ENV, fleet.FLEET_ENV: str(path)})
    assert isinstance(loaded, Fleet)
    assert loaded.names == ("eu", "us")
    eu, us = loaded.databases
    assert eu == FleetDatabase(
        "eu", "RDW_URL_EU", {"schema_name": "reporting", "statement_timeout_ms": 60000}
    )
    assert dict(us.target_db) == {"weeks_table": "report_weeks"}
    assert loaded.get("us") is us
    # Plain, frozen values: the URL is read from the environment when asked for.
    with pytest.raises(AttributeError):
        eu.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        eu.target_db["schema_name"] = "public"  # type: ignore[index]
    hash(eu)


def test_url_comes_from_the_environment_at_use(tmp_path, monkeypatch):
    path = write(tmp_path, "databases: [{name: eu, url_env: RDW_URL_EU}]\n")
    monkeypatch.setenv("RDW_URL_EU", SECRET_URL)
    monkeypatch.setenv(fleet.FLEET_ENV, str(path))
    eu = fleet.load().get("eu")
    assert eu.url() == SECRET_URL
    assert eu.resource_config() == {"url": SECRET_URL}
    monkeypatch.delenv("RDW_URL_EU")
    with pytest.raises(FleetFileError, match="fleet database 'eu': env RDW_URL_EU is not set"):
        eu.url()


def test_the_fields_are_target_dbs_less_url():
    from rdw_tracking.resources import TargetDatabase

    assert set(fleet.TARGET_DB_FIELDS) == set(TargetDatabase.model_fields) - {"url", "fleet_name"}
    for name, kind in fleet.TARGET_DB_FIELDS.items():
        assert TargetDatabase.model_fields[name].annotation is kind, name


def test_missing_file(tmp_path):
    with pytest.raises(FleetFileError, match="does not exist; fix RDW_FLEET_FILE"):
        fleet.load(tmp_path / "nope.yaml", environ=ENV)


def test_unreadable_file(tmp_path):
    with pytest.raises(FleetFileError, match="cannot be read"):
        fleet.load(tmp_path, environ=ENV)  # a folder


def test_malformed_yaml_quotes_no_line(tmp_path):
    message = refusal(
        tmp_path,
        f"""
        databases:
          - name: eu
            url_env: {SECRET_URL}: [
        """,
    )
    assert "is not valid YAML" in message and "line 4" in message


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "must be a YAML mapping with a `databases:` list, not an empty value"),
        ("- name: eu\n", "must be a YAML mapping with a `databases:` list, not a list"),
        ("just text\n", "not a string"),
        ("fleet: []\n", "unknown top-level key(s) fleet"),
        ("{}\n", "has no `databases:` list"),
        ("databases:\n", "has no `databases:` list"),
        ("databases: {eu: RDW_URL_EU}\n", "`databases` must be a list of entries, not a mapping"),
        ("databases: []\n", "`databases` is empty; add at least one entry"),
        ("databases: [eu]\n", "databases[0] must be a mapping with name and url_env, not a string"),
        ("databases:\n  - name: eu\n    name: us\n", "key 'name' appears twice"),
    ],
)
def test_file_shape_refused(tmp_path, text, words):
    assert words in refusal(tmp_path, text)


@pytest.mark.parametrize(
    "entry, words",
    [
        ("{url_env: RDW_URL_EU}", "databases[1] has no `name`"),
        ("{name: EU, url_env: RDW_URL_EU}", "databases[1] has a `name` that is not [a-z0-9_]+"),
        ("{name: eu-west, url_env: RDW_URL_EU}", "databases[1] has a `name` that is not"),
        ("{name: 7, url_env: RDW_URL_EU}", "databases[1] has a `name` that is not"),
        ("{name: ok}", "databases[1] ('ok') has no `url_env`"),
        ("{name: ok, url_env: 12}", "databases[1] ('ok') has a `url_env` that is not an env var"),
        (
            "{name: ok, url_env: 'postgresql://rdw:hunter22@db/reports'}",
            "never the URL itself",
        ),
        (
            "{name: ok, url_env: RDW_URL_US, url: 'postgresql://rdw:hunter22@db/reports'}",
            "databases[1] ('ok') has a `url` key, and the file must never hold a URL",
        ),
        (
            "{name: 'x:hunter22@', url: 'postgresql://rdw:hunter22@db/reports'}",
            "databases[1] has a `url` key",
        ),
        (
            "{name: ok, url_env: RDW_URL_US, schema: public}",
            "databases[1] ('ok') has unknown field(s) schema; the fields are name, url_env and",
        ),
        (
            "{name: ok, url_env: RDW_URL_US, lock_timeout_ms: '5s'}",
            "databases[1] ('ok') field lock_timeout_ms must be an integer, not a string",
        ),
        (
            "{name: ok, url_env: RDW_URL_US, lock_timeout_ms: true}",
            "field lock_timeout_ms must be an integer, not a boolean",
        ),
        (
            "{name: ok, url_env: RDW_URL_US, weeks_table: 12}",
            "field weeks_table must be a string, not an integer",
        ),
        ("{name: ok, url_env: RDW_URL_US, schema_name: ' '}", "field schema_name is empty"),
        (
            "{name: ok, url_env: RDW_URL_MISSING}",
            "databases[1] ('ok') names env RDW_URL_MISSING, which is not set (or empty); set it",
        ),
        (
            "{name: eu, url_env: RDW_URL_US}",
            "databases[1] ('eu') has the same name as databases[0]; give each database its own",
        ),
    ],
)
def test_entry_refused_naming_it(tmp_path, entry, words):
    text = f"databases:\n  - {{name: eu, url_env: RDW_URL_EU}}\n  - {entry}\n"
    message = refusal(tmp_path, text)
    assert words in message, message


def test_env_var_set_but_empty_is_refused(tmp_path):
    message = refusal(
        tmp_path, "databases: [{name: eu, url_env: RDW_URL_EU}]\n", environ={"RDW_URL_EU": " "}
    )
    assert "databases[0] ('eu') names env RDW_URL_EU, which is not set" in message
