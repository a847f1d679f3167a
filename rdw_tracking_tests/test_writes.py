"""The write-job guard: the second writer is refused at once, naming the first."""

import os

import dagster as dg
import pytest

from rdw_tracking.resources import TargetDatabase
from rdw_tracking.writes import exclusive_write
from rdw_tracking_tests.conftest import create_database, drop_database


def test_second_writer_is_refused_naming_the_first(db):
    with exclusive_write(db, "first_job"):
        with pytest.raises(dg.Failure) as err:
            with exclusive_write(db, "second_job"):
                pass
        message = err.value.description
        assert "second_job refused" in message
        assert "public.report_data_weeks" in message
        assert "rdw_tracking:first_job" in message
    # Released: the next writer gets it.
    with exclusive_write(db, "third_job"):
        pass


def test_refusal_names_the_holder_in_this_database(db, admin_url):
    """Another database on the same server, with its own report_data_weeks and its own
    write job running, is not who holds this database's lock."""
    other_name = f"rdw_test_{os.getpid()}_other_writer"
    other = TargetDatabase(url=create_database(admin_url, other_name))
    try:
        with exclusive_write(other, "other_database_job"), exclusive_write(db, "first_job"):
            with pytest.raises(dg.Failure) as err:
                with exclusive_write(db, "second_job"):
                    pass
        assert "rdw_tracking:first_job" in err.value.description
        assert "other_database_job" not in err.value.description
    finally:
        drop_database(admin_url, other_name)
