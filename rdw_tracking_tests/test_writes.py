"""The write-job guard: the second writer is refused at once, naming the first."""

import dagster as dg
import pytest

from rdw_tracking.writes import exclusive_write


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
