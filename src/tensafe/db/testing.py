"""Start a throw-away PostgreSQL server on loopback for tests and benchmarks.

Used by ``tests/fixtures/postgres.py`` and ``bench/audit_appends.py``. It runs the real
server binaries (``initdb``, ``pg_ctl``); when running as root it runs them as the
``postgres`` system user through ``runuser`` because ``initdb`` refuses root.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from tensafe.config import pg_bin
from tensafe.db.errors import DatabaseError

__all__ = ["DEFAULT_PG_BIN", "find_pg_bin", "start_postgres"]

#: Where Debian's postgresql-15 package puts the server binaries.
DEFAULT_PG_BIN = "/usr/lib/postgresql/15/bin"

_SERVICE_USER = "postgres"


def find_pg_bin() -> Path:
    """Return the directory holding ``initdb`` and ``pg_ctl``.

    Looks at ``TENSAFE_PG_BIN``, then :data:`DEFAULT_PG_BIN`, then ``initdb`` on ``PATH``.

    Raises:
        DatabaseError: No PostgreSQL server binaries were found.
    """
    candidates = [pg_bin(), DEFAULT_PG_BIN]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    raise DatabaseError(
        "PostgreSQL server binaries not found: install Debian's postgresql-15 (apt-get install "
        "postgresql) or set TENSAFE_PG_BIN to the directory holding initdb and pg_ctl"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_postgres(
    base_dir: str | os.PathLike[str] | None = None,
    *,
    durable: bool = True,
    database: str = "tensafe_test",
    timeout_s: int = 60,
) -> tuple[str, Callable[[], None]]:
    """Initialise and start a private PostgreSQL server on ``127.0.0.1``.

    Args:
        base_dir: Parent of the server's temporary directory (default: the system temp
            directory). When running as root the ``postgres`` user must be able to
            traverse it.
        durable: Keep PostgreSQL's default durability (``fsync=on``). Tests pass False to
            turn fsync off, which is faster and harmless for throw-away data; benchmarks
            keep the default so that figures mean something.
        database: Name of the database created for the caller.
        timeout_s: Seconds to wait for the server to accept connections.

    Returns:
        ``(url, stop)``: a ``postgresql+psycopg://postgres@127.0.0.1:PORT/DATABASE`` URL
        (trust authentication, loopback only) and a function that stops the server and
        deletes its files. ``stop`` is idempotent and also runs at interpreter exit.

    Raises:
        DatabaseError: The binaries are missing or the server did not start; the message
            holds the end of the server log.
    """
    bin_dir = find_pg_bin()
    as_root = os.geteuid() == 0
    run_prefix: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="tensafe-pg-", dir=base_dir))
    if as_root:
        try:
            service = pwd.getpwnam(_SERVICE_USER)
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            raise DatabaseError(
                "running as root, but there is no 'postgres' user to run initdb as: install Debian's "
                "postgresql package or run as an unprivileged user"
            ) from None
        runuser = shutil.which("runuser")
        if runuser is None:
            shutil.rmtree(root, ignore_errors=True)
            raise DatabaseError("running as root needs runuser (util-linux) to start PostgreSQL")
        os.chown(root, service.pw_uid, service.pw_gid)
        run_prefix = [runuser, "-u", _SERVICE_USER, "--"]
    data_dir = root / "data"
    socket_dir = root / "sock"
    log_file = root / "server.log"
    stopped = False

    def run(args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*run_prefix, *args], capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if check and result.returncode != 0:
            raise DatabaseError(
                f"{Path(args[0]).name} failed (exit {result.returncode}): "
                f"{_tail(result.stderr + result.stdout)}{_log_tail(log_file)}"
            )
        return result

    def stop() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        if (data_dir / "postmaster.pid").exists():
            run([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-w", "stop"], check=False)
        shutil.rmtree(root, ignore_errors=True)

    try:
        run(["mkdir", "-p", str(socket_dir)])
        run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                *([] if durable else ["--no-sync"]),
            ]
        )
        settings = [
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{socket_dir}'",
            "max_connections = 200",
            "shared_buffers = 64MB",
        ]
        if not durable:
            settings += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        last_error: DatabaseError | None = None
        for _attempt in range(3):
            port = _free_port()
            conf = "\n".join([*settings, f"port = {port}"]) + "\n"
            _write_conf(data_dir / "postgresql.auto.conf", conf, run_prefix)
            try:
                run(
                    [
                        str(bin_dir / "pg_ctl"),
                        "-D",
                        str(data_dir),
                        "-l",
                        str(log_file),
                        "-w",
                        "-t",
                        str(timeout_s),
                        "start",
                    ]
                )
            except DatabaseError as exc:  # most likely a port race: pick another port
                last_error = exc
                continue
            break
        else:
            assert last_error is not None
            raise last_error
        run(
            [
                str(bin_dir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                database,
            ]
        )
    except BaseException:
        stop()
        raise
    atexit.register(stop)
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}", stop


def _write_conf(path: Path, text: str, run_prefix: Sequence[str]) -> None:
    # postgresql.auto.conf belongs to the service user; rewrite it as that user.
    subprocess.run(
        [*run_prefix, "sh", "-c", 'cat > "$1"', "sh", str(path)],
        input="# Written by tensafe.db.testing\n" + text,
        text=True,
        check=True,
        capture_output=True,
    )


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def _log_tail(log_file: Path) -> str:
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return ""
    return f"; server log: {_tail(text)}" if text.strip() else ""
