"""A throwaway PostgreSQL server for the tests and the fleet benchmark: a fresh cluster in a
temporary directory, on a free port.

Debian's `postgresql` package gives `initdb` and `pg_ctl` (under /usr/lib/postgresql/N/bin). The
server refuses to run as root, so when we are root it runs as the `postgres` user (or `nobody`).
Password authentication over TCP, as a deployment has it; administration goes over the Unix
socket. bon connects as `bon`, an ordinary role that owns each database it is given.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

ROLE, PASSWORD = "bon", "s3cret-pw"
SUPERUSER_PASSWORD = "super-s3cret"


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresMissing(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


class PostgresCluster:
    """initdb, start, stop, and databases owned by the `bon` role."""

    def __init__(self):
        initdb, pg_ctl, psql = _binary("initdb"), _binary("pg_ctl"), _binary("psql")
        if not (initdb and pg_ctl and psql):
            raise PostgresMissing(
                "PostgreSQL (initdb, pg_ctl, psql) is not installed: apt-get install postgresql"
            )
        self.pg_ctl, self.psql = pg_ctl, psql
        self.user = None
        if os.geteuid() == 0:
            self.user = "postgres" if _has_user("postgres") else "nobody"
        self.root = Path(tempfile.mkdtemp(prefix="bon-pg-"))
        self.data, self.socket_dir = self.root / "data", self.root / "socket"
        self.socket_dir.mkdir()
        password_file = self.root / "pw"
        password_file.write_text(SUPERUSER_PASSWORD + "\n")
        if self.user:
            record = pwd.getpwnam(self.user)
            for path in (self.root, self.socket_dir, password_file):
                os.chown(path, record.pw_uid, record.pw_gid)
        self.port = _free_port()
        self._run(
            [initdb, "-D", str(self.data), "-U", "postgres", "--pwfile", str(password_file),
             "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"]
        )  # fmt: skip
        self.start()
        self.sql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")

    def _run(self, command: list[str]) -> subprocess.CompletedProcess:
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True, cwd=self.root)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1"
        self._run(
            [self.pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start"]
        )

    def stop(self, mode: str = "fast") -> None:
        self._run([self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop"])

    def sql(self, statement: str, database: str = "postgres") -> str:
        result = self._run(
            [self.psql, "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres", "-d", database,
             "-v", "ON_ERROR_STOP=1", "-At", "-c", statement]
        )  # fmt: skip
        return result.stdout.strip()

    def database(self, owner: str = ROLE) -> str:
        """A fresh database owned by `owner`; its URL as `bon`."""
        name = f"bon_{uuid.uuid4().hex[:10]}"
        self.sql(f"CREATE DATABASE {name} OWNER {owner}")
        return self.url(name)

    def url(self, database: str, role: str = ROLE, password: str = PASSWORD) -> str:
        return f"postgresql://{role}:{password}@127.0.0.1:{self.port}/{database}"

    def close(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def wait_down(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.data / "postmaster.pid").exists():
            time.sleep(0.1)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
