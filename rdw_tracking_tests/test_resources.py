"""TargetDatabase: session settings, and failures that name the place but not the secret."""

import pytest

from rdw_tracking.resources import TargetDatabase, TargetDatabaseError, redact
from rdw_tracking_tests.conftest import PASSWORD


def test_every_connection_sets_utc_name_and_timeouts(database_url):
    db = TargetDatabase(url=database_url, statement_timeout_ms=1234, lock_timeout_ms=567)
    with db.connect() as conn:
        settings = conn.execute(
            "SELECT current_setting('TimeZone'), current_setting('application_name'),"
            " current_setting('statement_timeout'), current_setting('lock_timeout')"
        ).fetchone()
    assert settings == ("UTC", "rdw_tracking", "1234ms", "567ms")


def test_url_defaults_to_environment(database_url):
    assert TargetDatabase().resolved_url() == database_url


def test_unreachable_server_names_host_and_database():
    db = TargetDatabase(url="postgresql://someone:hunter22@127.0.0.1:1/reports")
    with pytest.raises(TargetDatabaseError) as err:
        with db.connect():
            pass
    message = str(err.value)
    assert "127.0.0.1:1/reports" in message and "schema public" in message
    assert "hunter22" not in message


def test_malformed_url_is_a_clear_error(monkeypatch):
    bad = "postgresql://a:b@host:notaport/db?sslmode=bogus="
    monkeypatch.setenv("RDW_DATABASE_URL", bad)
    with pytest.raises(TargetDatabaseError, match="not a valid libpq URI") as err:
        TargetDatabase().describe()
    assert not err.value.allow_retries  # a malformed URL stays malformed
    # Given as the resource's url, it is refused as the resource is built.
    with pytest.raises(ValueError, match="url is not a valid libpq URI"):
        TargetDatabase(url=bad)


def test_wrong_password_names_place_not_password(password_url):
    wrong = password_url.replace(PASSWORD, "not-the-" + PASSWORD)
    db = TargetDatabase(url=wrong)
    with pytest.raises(TargetDatabaseError) as err:
        with db.connect():
            pass
    message = str(err.value)
    assert "password authentication failed" in message
    assert PASSWORD not in message and "rdw_test_" in message
    # The right password works.
    with TargetDatabase(url=password_url).connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_missing_schema_is_named(database_url):
    db = TargetDatabase(url=database_url, schema_name="reporting")
    with pytest.raises(TargetDatabaseError, match="schema 'reporting' does not exist"):
        with db.connect():
            pass


def test_redact_masks_passwords_in_any_form():
    url = "postgresql://u:p%40ss@h/db"
    assert "p%40ss" not in redact("failed for postgresql://u:p%40ss@h/db", url)
    assert "xyz" not in redact("dsn password=xyz host=h", None)


@pytest.mark.parametrize(
    "field,value",
    [("schema_name", ""), ("weeks_table", "x" * 64), ("lock_timeout_ms", -1), ("url", " ")],
)
def test_bad_config_is_refused_naming_the_field(field, value):
    with pytest.raises(Exception, match=field):
        TargetDatabase(**{field: value})


def test_statement_timeout_is_a_clear_failure(database_url):
    from rdw_tracking.resources import StatementTimeout

    db = TargetDatabase(url=database_url, statement_timeout_ms=100)
    with pytest.raises(StatementTimeout) as err:
        with db.connect() as conn:
            conn.execute("SELECT pg_sleep(2)")
    message = err.value.description
    assert "statement_timeout after 100 ms" in message
    assert "target_db.statement_timeout_ms" in message
    assert not err.value.allow_retries
