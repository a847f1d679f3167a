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
    """SIGTERM to its process group, SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
