"""A throwaway PostgreSQL server for the tests, and the ``db_url`` fixture.

``postgres_server`` (session scope) starts a private PostgreSQL with the
machine's own binaries and stops it when the session ends, whatever
happened::

    initdb   into a fresh temporary folder (password auth on TCP)
    pg_ctl   start on a free loopback port, unix socket in that folder
    ...      tests create one database each (``pg_url``)
    pg_ctl   stop -m immediate, and the folder is deleted

PostgreSQL refuses to run as root, so when the tests run as root (CI does)
every server command runs as the ``postgres`` system user through
``runuser`` (the user is created if the machine has none).  The binaries
are found on PATH or under ``/usr/lib/postgresql/<version>/bin`` (Debian's
place; ``.ci/run`` installs the package when neither has them).

When no server can be started (no binaries, no psycopg) the PostgreSQL
tests are skipped with the reason, except under ``CI=true``, where that is a
failure: CI must never pass by skipping them.

Fixtures: ``postgres_server``, ``pg_url`` (a new empty database per test),
``db_url`` (parametrized: a SQLite path, then a PostgreSQL URL),
``restartable_postgres`` (a server of its own, which a test may kill and start
again).  Helper:
``query_db(db_url, sql, params)`` reads either kind of database.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import re
import secrets
import shutil
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import pytest

PG_USER = "postgres"          # the system user the server runs as (when we are root)
SUPERUSER = "postgres"        # the database role the tests connect as
START_TIMEOUT = 30            # s for pg_ctl to see the server accept connections


class Unavailable(Exception):
    """No PostgreSQL server can be started here; the message says why."""


def find_bindir() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres`` of one version.

    ``initdb`` on PATH wins (resolved through symlinks, so ``pg_ctl`` comes
    from the same version); otherwise the newest
    ``/usr/lib/postgresql/<version>/bin``.  Raises :class:`Unavailable`.
    """
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        raise Unavailable("PostgreSQL server binaries not found (no initdb on PATH or in "
                          "/usr/lib/postgresql/*/bin); on Debian: apt-get install postgresql")
    newest = max(found, key=lambda p: [int(n) for n in re.findall(r"\d+", p)])
    return Path(newest).parent


class PostgresServer:
    """One private PostgreSQL server in a temporary folder.

    ``url(dbname)`` is a ``postgresql://`` URL with the superuser's
    password in it; ``password`` is that password (tests check that it
    never reaches a log).  :meth:`stop` is idempotent and always removes
    the folder.
    """

    def __init__(self, durable_commits: bool = False):
        self.durable_commits = durable_commits
        self.bindir = find_bindir()
        self.as_user = []            # command prefix that drops root
        self.folder = Path(tempfile.mkdtemp(prefix="sales-pg-"))
        self.data = self.folder / "data"
        self.password = "pw-" + secrets.token_hex(8)
        self.port = None
        self._names = itertools.count(1)

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """initdb + pg_ctl start; raises :class:`Unavailable` with the log on failure."""
        if os.geteuid() == 0:
            user = _system_user(PG_USER)
            shutil.chown(self.folder, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", PG_USER, "--"]
        pwfile = self.folder / "superuser.pw"
        pwfile.write_text(self.password + "\n")
        if self.as_user:
            shutil.chown(pwfile, PG_USER)
        # -N: skip fsync (a throwaway cluster); --no-locale: byte-order text.
        self._run("initdb", "-D", self.data, "-U", SUPERUSER, "--pwfile", pwfile,
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                  "--no-locale", "-N")
        pwfile.unlink()
        from conftest import free_port   # here: conftest imports this module
        for _ in range(3):  # another process may take the port between pick and bind
            self.port = free_port()
            try:
                self.start_again()
                return
            except Unavailable:
                if "could not bind" not in self.log():
                    raise
        raise Unavailable(f"PostgreSQL could not bind a port:\n{self.log()}")

    def start_again(self) -> None:
        """pg_ctl start on the same folder and port (after :meth:`kill`)."""
        # fsync=off: the tests kill clients and at most this server's processes,
        # never the machine, and it makes CREATE DATABASE and commits cheap on a
        # busy 2-core box.  synchronous_commit=off would also lose the last
        # commits of a server that is killed, so durable_commits keeps it on.
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                   f"-c unix_socket_directories={self.folder} -c fsync=off "
                   f"-c full_page_writes=off")
        if not self.durable_commits:
            options += " -c synchronous_commit=off"
        self._run("pg_ctl", "-D", self.data, "-l", self.folder / "server.log",
                  "-w", "-t", str(START_TIMEOUT), "-o", options, "start")

    def kill(self) -> None:
        """Stop the server at once, as a crash would (``pg_ctl -m immediate``);
        the folder stays, for :meth:`start_again`."""
        self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        """Stop the server (immediate shutdown) and delete its folder."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace") if path.exists() else "(no server log)"

    def _run(self, program: str, *args) -> None:
        cmd = [*self.as_user, str(self.bindir / program), *map(str, args)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT + 30,
                              cwd=self.folder)
        if done.returncode != 0:
            raise Unavailable(f"{program} failed ({done.returncode}): {done.stderr.strip()}\n"
                              f"{self.log()}")

    # --- databases ---------------------------------------------------------

    def url(self, dbname: str = "postgres", password: str | None = None) -> str:
        """A URL for ``dbname`` (with the real password unless one is given)."""
        password = self.password if password is None else password
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self.port}/{dbname}"

    def execute(self, sql: str, params=(), dbname: str = "postgres") -> list[tuple]:
        """Run one statement as the superuser (autocommit); return its rows, if any."""
        import psycopg
        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def create_database(self, hint: str = "test") -> str:
        """Create an empty database; return its name (unique, from ``hint``)."""
        name = f"t{next(self._names)}_" + re.sub(r"[^a-z0-9]+", "_", hint.lower())[:40]
        self.execute(f'CREATE DATABASE "{name}"')
        return name


def _system_user(name: str) -> pwd.struct_passwd:
    """The system user ``name``; created (no home, no login shell) if missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", name], check=True,
                       capture_output=True, timeout=30)
        return pwd.getpwnam(name)


def _unavailable(reason: str):
    """Skip locally; fail under CI=true, where a skipped backend is a hole."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(f"no PostgreSQL server for the tests: {reason}")


# --- fixtures ----------------------------------------------------------------

def _running_server(durable_commits: bool = False):
    """Start a private PostgreSQL server, yield it, always stop it; skip (or, under
    CI=true, fail) with the reason when none can be started."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        _unavailable(f"{exc} (pip install -r requirements.txt)")
    try:
        server = PostgresServer(durable_commits=durable_commits)
    except Unavailable as exc:
        _unavailable(str(exc))
    try:
        try:
            server.start()
        except (Unavailable, OSError, subprocess.SubprocessError) as exc:
            _unavailable(str(exc))
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """A running private PostgreSQL server for the whole session (see the module doc)."""
    yield from _running_server()


@pytest.fixture
def pg_url(postgres_server, request) -> str:
    """The URL of a new, empty database on the session's PostgreSQL server."""
    return postgres_server.url(postgres_server.create_database(request.node.name))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """Where a test's results go: a SQLite file, then a fresh PostgreSQL database.

    The PostgreSQL server is started only when a test actually gets the
    ``postgresql`` value, so ``-k sqlite`` runs need none.
    """
    if request.param == "sqlite":
        return str(tmp_path / "results.sqlite")
    return request.getfixturevalue("pg_url")


def query_db(db_url: str, sql: str, params=()) -> list[tuple]:
    """Run a read-only query (``?`` placeholders) against either kind of database."""
    if not db_url.startswith(("postgresql://", "postgres://")):
        con = sqlite3.connect(db_url)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()
    import psycopg
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute(sql.replace("?", "%s"), params).fetchall()


@pytest.fixture
def restartable_postgres():
    """A private PostgreSQL server of the test's own, with durable commits, so
    that a test can kill it (:meth:`PostgresServer.kill`) and start it again
    without losing what was committed."""
    yield from _running_server(durable_commits=True)
