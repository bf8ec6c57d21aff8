"""Throwaway Postgres and Redis servers for the service tests, started when none is given.

A Postgres cluster is made with `initdb` in a temporary folder and served on a free
loopback port; a `redis-server` runs on another free port, saving nothing. Both are
stopped, and their folders removed, when the test process exits. The binaries come
from PATH or Debian's standard places. As root, Postgres runs as an unprivileged user
(it refuses to run as root).
"""

from __future__ import annotations

import atexit
import functools
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

POSTGRES_PACKAGE = "PostgreSQL's server (Debian: apt-get install postgresql)"
REDIS_PACKAGE = "redis-server (Debian: apt-get install redis-server)"
# Users a root test run hands the Postgres cluster to, in this order.
UNPRIVILEGED_USERS = ("postgres", "nobody")
START_SECONDS = 60


class Missing(Exception):
    """A server binary is not installed; the message names what to install."""


def _run(command: list[str], **kwargs) -> None:  # type: ignore[no-untyped-def]
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {(done.stderr or done.stdout)[-2000:]}")


def _at_exit_of_this_process(stop) -> None:  # type: ignore[no-untyped-def]
    """Run `stop` when this process exits, and not in a child forked from it."""
    owner = os.getpid()
    atexit.register(lambda: stop() if os.getpid() == owner else None)


@functools.cache
def server_url(variable: str) -> str:
    """The URL in `variable`, or else of a throwaway server started once for this process.

    Raises Missing when none is given and the server is not installed.
    """
    given = os.environ.get(variable)
    if given:
        return given
    return {"PIVOTMERGE_TEST_PG": start_postgres, "PIVOTMERGE_TEST_REDIS": start_redis}[variable]()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_binary(name: str, debian_globs: tuple[str, ...]) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted((p for pattern in debian_globs for p in glob.glob(pattern)), key=_version_key)
    return candidates[-1] if candidates else None


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(part) for part in Path(path).parts if part.isdigit())


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged user Postgres runs as when this process is root; None when it is not root."""
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise Missing("an unprivileged user to run Postgres as (none of: " + ", ".join(UNPRIVILEGED_USERS) + ")")


def start_postgres() -> str:
    """A fresh cluster with a passwordless superuser `postgres`; returns the URL of its `postgres` database."""
    found = find_binary("initdb", ("/usr/lib/postgresql/*/bin/initdb",))
    if found is None:
        raise Missing(POSTGRES_PACKAGE)
    initdb = Path(found).resolve()
    pg_ctl = initdb.with_name("pg_ctl")
    user = _run_as()
    folder = Path(tempfile.mkdtemp(prefix="pivotmerge-pg-"))
    data = folder / "data"
    as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    if user:
        os.chown(folder, user.pw_uid, user.pw_gid)
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    _run([str(initdb), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"],
         env=env, cwd=folder, **as_user)
    port = free_port()
    options = (f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off "
               "-c synchronous_commit=off -c max_connections=300")

    def stop() -> None:
        subprocess.run([str(pg_ctl), "-D", str(data), "-m", "immediate", "stop"], capture_output=True, env=env,
                       cwd=folder, **as_user)
        shutil.rmtree(folder, ignore_errors=True)

    _at_exit_of_this_process(stop)
    _run([str(pg_ctl), "-D", str(data), "-l", str(folder / "log"), "-o", options, "-w", "-t", str(START_SECONDS),
          "start"], env=env, cwd=folder, **as_user)

    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def start_redis() -> str:
    """A redis-server on a free loopback port, keeping nothing on disk; returns its URL."""
    binary = find_binary("redis-server",
                         ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server"))
    if binary is None:
        raise Missing(REDIS_PACKAGE)
    folder = Path(tempfile.mkdtemp(prefix="pivotmerge-redis-"))
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--dir", str(folder), "--logfile", str(folder / "log")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        process.terminate()
        process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)

    _at_exit_of_this_process(stop)
    deadline = time.monotonic() + START_SECONDS
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not start: {(folder / 'log').read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
