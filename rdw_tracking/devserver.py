"""`dg dev` (webserver + daemon) as a child process: start, wait, ask, stop.

Started from Python in a process group of its own and stopped by that group's pid: a
`dg dev` put in the background by a shell script ignores SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

from psycopg.conninfo import conninfo_to_dict


def sqlalchemy_url(libpq: str) -> str:
    """The `postgresql+psycopg2://` URL dagster-postgres needs, for a libpq conninfo or URI.

    psycopg2, not psycopg 3: with SQLAlchemy 2.1 the latter leaves runs in NOT_STARTED.
    """
    info = conninfo_to_dict(libpq)
    user = quote(str(info.get("user") or "postgres"), safe="")
    password = f":{quote(str(info['password']), safe='')}" if info.get("password") else ""
    query = [f"host={quote(str(info.get('host') or 'localhost'), safe='')}"]
    if info.get("port"):
        query.append(f"port={info['port']}")
    return f"postgresql+psycopg2://{user}{password}@/{info['dbname']}?{'&'.join(query)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    """`data` of a GraphQL answer from the webserver on `port`; errors raise."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.load(response)
    if body.get("errors"):
        raise RuntimeError(body["errors"])
    return body["data"]


def start(
    workspace: Path,
    port: int,
    env: Mapping[str, str] | None = None,
    log=None,
    host: str = "127.0.0.1",
    cwd: Path | None = None,
) -> subprocess.Popen:
    """`dg dev` in a new process group (its webserver, daemon and code server).

    Given the workspace file, `dg dev` needs no project folder: it runs the same from a
    checkout and from an installed wheel. `cwd` defaults to this process's own."""
    # `python -m dagster_dg_cli`: the `dg` script sits in whichever venv installed it.
    command = [sys.executable, "-m", "dagster_dg_cli.cli", "dev", "-w", str(workspace)]
    return subprocess.Popen(
        [*command, "-h", host, "-p", str(port)],
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        start_new_session=True,
    )


def wait_ready(proc: subprocess.Popen, port: int, timeout_s: float) -> None:
    """Until the webserver answers GraphQL; raises if it exits or takes longer."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"dg dev exited with code {proc.returncode}")
        try:
            if graphql(port, "{ version }").get("version"):
                return
        except (OSError, RuntimeError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"dg dev did not answer on port {port} within {timeout_s} s")
        time.sleep(0.5)


def stop(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM to its process group, SIGKILL to whatever of the group is left after
    `timeout_s`; returns when none of it runs.

    The whole group, not only `dg dev`: its webserver, daemon and code server, and the
    run workers the code server started, all share the group, and may outlive `dg dev`
    (or be left by a `dg dev` that ended on its own)."""
    group = proc.pid
    deadline = time.monotonic() + timeout_s
    _signal_group(group, signal.SIGTERM)
    while _group_alive(group) and time.monotonic() < deadline:
        proc.poll()  # reaps `dg dev` itself once it exits
        time.sleep(0.1)
    if _group_alive(group):
        _signal_group(group, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _group_alive(group) and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.1)
    proc.wait(timeout=10)


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass  # every member has exited already


def _group_alive(group: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: ours is reaped
    by `proc.poll()`, an orphan's by init, neither can be killed."""
    proc_root = Path("/proc")
    if not proc_root.is_dir():  # not Linux: zombies count, briefly
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc_root.glob("[0-9]*/stat"):
        try:
            # after the command's closing parenthesis: state, ppid, pgrp
            state, _ppid, pgrp = stat.read_text().rpartition(")")[2].split()[:3]
        except (OSError, ValueError):
            continue  # exited while we looked
        if int(pgrp) == group and state != "Z":
            return True
    return False
