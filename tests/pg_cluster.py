"""A throwaway PostgreSQL server for the test suite: ``initdb`` + ``pg_ctl`` from the installed packages.

``make test`` runs ``.ci/postgres`` first, which installs the Debian ``postgresql`` package when its server
binaries are missing. The cluster lives in a temporary directory, listens on 127.0.0.1 on a free port
with ``trust`` authentication, and runs without fsync (a test never outlives it). PostgreSQL refuses to run
as root, so under root it runs as the ``postgres`` user (which the Debian package creates) through
``runuser``. When it truly cannot start, :class:`PostgresUnavailable` says why and the tests skip with it.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

BINDIR_ENV = "LASER_TEST_PG_BINDIR"
INSTALL_HINT = "install the Debian 'postgresql' package (`make test` does it: .ci/postgres)"


class PostgresUnavailable(Exception):
    """PostgreSQL cannot run here; the message says why and what would fix it."""


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", path.parent.name)) or (0,)


def find_bindir() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``: $LASER_TEST_PG_BINDIR, the newest Debian version, or PATH."""
    candidates = [Path(os.environ[BINDIR_ENV])] if os.environ.get(BINDIR_ENV) else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    return next((c for c in candidates if (c / "initdb").is_file() and (c / "pg_ctl").is_file()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    """One running cluster; :meth:`create_database` hands each test a fresh, empty database."""

    SUPERUSER = "laser"

    def __init__(self, root: Path, bindir: Path, run_as: str | None) -> None:
        self.root = root
        self.bindir = bindir
        self.run_as = run_as
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = 0

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.run_as is not None:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text()[-1500:]
        except OSError:
            return ""

    @classmethod
    def start(cls) -> LocalPostgres:
        bindir = find_bindir()
        if bindir is None:
            raise PostgresUnavailable(f"no PostgreSQL server binaries (initdb, pg_ctl) found; {INSTALL_HINT}")
        run_as = None
        owner = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root, and there is no 'postgres' user to run PostgreSQL as "
                                          f"(it refuses root); {INSTALL_HINT}") from None
            if shutil.which("runuser") is None:
                raise PostgresUnavailable("running as root without `runuser` to start PostgreSQL as 'postgres'")
            run_as = "postgres"
        root = Path(tempfile.mkdtemp(prefix="laser-pg-"))
        if owner is not None:
            os.chown(root, owner.pw_uid, owner.pw_gid)
        pg = cls(root, bindir, run_as)
        try:
            pg._init_and_start()
        except BaseException:
            pg.stop()
            raise
        return pg

    def _init_and_start(self) -> None:
        init = self._run("initdb", "-D", str(self.data), "-U", self.SUPERUSER, "--auth=trust", "-E", "UTF8",
                         "--no-sync", "--no-instructions")
        if init.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {(init.stderr or init.stdout)[-1500:]}")
        for _ in range(5):  # a free port can be taken between choosing it and binding it: try another
            self.port = _free_port()
            options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
            started = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                                "-o", options, "start")
            if started.returncode == 0:
                return
            if "could not bind" not in self._log_tail() and "in use" not in self._log_tail():
                break
        raise PostgresUnavailable(f"PostgreSQL did not start: {started.stderr[-500:]} {self._log_tail()}")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
