"""A write job whose peer goes silent: through a TCP proxy on 127.0.0.1 that stops
forwarding (its kernel still acknowledges every byte and answers keepalives, so no TCP
setting notices), the job fails within its client-side deadline, names the lost
connection, lets go of its write lock, and a rerun resumes exactly (issue 25)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import suppress

import dagster as dg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from rdw_tracking import resources
from rdw_tracking.assets.rollback import RollbackConfig, rollback
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.rollback import ROLLBACK_JOB
from rdw_tracking.rollback import walk as walk_module
from rdw_tracking.writes import exclusive_write, lock_key
from rdw_tracking_tests.assets.test_rollback import days_ago

LOG = logging.getLogger("rdw_tracking_tests.silent_peer")
CUTOFF = days_ago(60)


class SilentProxy:
    """Forwards TCP connections from 127.0.0.1 to the server until `silent` is set; from
    then on it reads and drops every byte (acknowledged, never forwarded). A side that
    closes still closes the other: the server ends a session whose client has gone."""

    def __init__(self, target_url: str) -> None:
        params = conninfo_to_dict(target_url)
        host, port = params.get("host") or "localhost", int(params.get("port") or 5432)
        self.target = (
            (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}")
            if host.startswith("/")
            else (socket.AF_INET, (host, port))
        )
        self.silent = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database_url: str) -> str:
        params = conninfo_to_dict(database_url)
        params.update(host="127.0.0.1", port=str(self.port))
        return make_conninfo("", **params)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.socket(self.target[0])
            server.connect(self.target[1])
            self.sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with suppress(OSError):
            while data := src.recv(65536):
                if not self.silent.is_set():
                    dst.sendall(data)
        for sock in (src, dst):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            with suppress(OSError):
                sock.close()


@pytest.fixture
def proxy(admin_url):
    found = SilentProxy(admin_url)
    yield found
    found.close()


def write_lock_held(sql_exec, db: TargetDatabase) -> bool:
    classid, objid = lock_key(db)
    return bool(
        sql_exec(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s "
            "AND objid = %s AND objsubid = 2",
            [classid, objid],
        )[0][0]
    )


@pytest.mark.parametrize("silent", ["batches", "write lock"])
def test_a_silent_peer_fails_the_rollback_in_time_and_a_rerun_resumes(
    database_url, sql_exec, proxy, monkeypatch, silent
):
    # statement_timeout 2 s and a 1 s margin: the deadline is 3 s (60 s by default)
    monkeypatch.setattr(resources, "DEADLINE_MARGIN_S", 1.0)
    proxied = TargetDatabase(url=proxy.url(database_url), statement_timeout_ms=2_000)
    direct = TargetDatabase(url=database_url, statement_timeout_ms=2_000)
    # the batches through the proxy, or only the session holding the write lock
    locker, worker = (proxied, proxied) if silent == "batches" else (proxied, direct)
    real_wait = walk_module.wait_for_wal_room
    batches = {"n": 0, "silent_at": None}

    def go_silent_at_third_batch(conn, most):
        batches["n"] += 1
        if batches["n"] == 3:
            proxy.silent.set()
            batches["silent_at"] = time.monotonic()
        return real_wait(conn, most)

    monkeypatch.setattr(walk_module, "wait_for_wal_room", go_silent_at_third_batch)
    config = RollbackConfig(cutoff_date=CUTOFF, dry_run=False, batch_size=100)
    with pytest.raises(dg.Failure) as failure:
        with exclusive_write(locker, ROLLBACK_JOB):
            rollback(worker, config, LOG)
    took = time.monotonic() - batches["silent_at"]
    text = failure.value.description
    assert took < 15, f"took {took:.1f} s to notice"
    assert "was lost (no answer from the server within 3 s" in text, text
    assert "run" in text and "again" in text
    if silent == "write lock":
        assert "holding its write lock" in text
    # the sessions it held are gone, and their lock with them
    deadline = time.monotonic() + 10
    while write_lock_held(sql_exec, direct):
        assert time.monotonic() < deadline, "the write lock outlived the job"
        time.sleep(0.1)
    # the rerun resumes the same rollback and ends exactly
    monkeypatch.setattr(walk_module, "wait_for_wal_room", real_wait)
    with exclusive_write(direct, ROLLBACK_JOB):
        again = rollback(direct, config, LOG)
    assert again.resumed and again.cleared_rows == again.matched_rows
    assert not sql_exec(
        "SELECT 1 FROM report_data_weeks WHERE execution_id IS NOT NULL "
        "AND created_at >= %s::date AND created_at < %s",
        [CUTOFF, again.upper_bound],
    )
    assert sql_exec("SELECT count(*), count(DISTINCT id) FROM execution_id_rollback_backup") == [
        (again.cleared_rows, again.cleared_rows)
    ]


def test_every_connection_bounds_its_waits(database_url):
    db = TargetDatabase(url=database_url, statement_timeout_ms=5_000)
    with db.connect() as conn:
        assert conn.deadline_s == 5 + resources.DEADLINE_MARGIN_S
        assert conn.info.get_parameters().get("tcp_user_timeout") == str(
            resources.TCP_USER_TIMEOUT_MS
        )
