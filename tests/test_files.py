"""Files only their owner can touch: the persist file and its WAL, explicit ipc sockets,
key directories, certificate and passphrase files. Checked as a second local user
(``nobody``) where the machine allows it (root: CI)."""

from __future__ import annotations

import os
import pathlib
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

import pytest
import zmq
from conftest import stop

import zproc
from zproc import _security

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "files secret, long enough 6f1a"

pytestmark = pytest.mark.skipif(os.name != "posix", reason="Unix owners and modes")


def _nobody() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("a second local user needs root (chown, setuid)")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")


def as_nobody(action: Callable[[], None]) -> int:
    """Run ``action`` in a forked child as ``nobody``; 0 if it ran through, else the errno
    of the OSError it raised (or 255 for anything else)."""
    user = _nobody()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, just the attempt
        code = 255
        try:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            action()
            code = 0
        except OSError as exc:
            code = exc.errno or 254
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def shared_dir() -> Iterator[pathlib.Path]:
    """A directory others may enter and list (0755) but not write, on a path they can
    traverse (pytest's tmp_path is under a 0700 directory): only the files' modes protect
    them. A world-readable control file shows that the second user gets that far."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix="zproc-files-"))
    folder.chmod(0o755)
    control = folder / "control"
    control.write_text("readable")
    control.chmod(0o644)
    try:
        if os.geteuid() == 0:
            assert as_nobody(lambda: open(control, "rb").close()) == 0
        control.unlink()
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: pathlib.Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _zproc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zproc", *args], capture_output=True, text=True, timeout=60,
        cwd=ROOT, env={**os.environ, **(env or {})}, check=False,
    )


# -- the persist file ---------------------------------------------------------------------


def test_persist_file_and_wal_are_0600_whatever_the_umask(
    shared_dir: pathlib.Path, open_umask: None
) -> None:
    path = shared_dir / "state.db"
    server, address = zproc.start_server(persist=path)
    try:
        with zproc.State(address) as state:
            state["secret"] = "only the server's user may read this"
        assert _mode(path) == 0o600
        wal = pathlib.Path(f"{path}-wal")
        assert wal.exists() and _mode(wal) == 0o600
        if os.geteuid() == 0:
            for file in (path, wal):
                assert as_nobody(lambda f=file: open(f, "rb").close()) == 13  # EACCES
    finally:
        stop(server)


def test_an_existing_own_persist_file_is_made_0600(shared_dir: pathlib.Path) -> None:
    path = shared_dir / "state.db"
    server, _ = zproc.start_server(persist=path)
    stop(server)
    path.chmod(0o644)
    server, _ = zproc.start_server(persist=path)
    try:
        assert _mode(path) == 0o600
    finally:
        stop(server)


def test_a_persist_file_writable_by_others_is_refused(shared_dir: pathlib.Path) -> None:
    path = shared_dir / "state.db"
    path.touch()
    path.chmod(0o666)
    with pytest.raises(PermissionError, match="mode 0666") as info:
        zproc.start_server(persist=path)
    assert f"chmod go-w {path}" in str(info.value)
    open_dir = shared_dir / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(PermissionError, match="the directory of the persist file") as info:
        zproc.start_server(persist=open_dir / "state.db")
    assert f"chmod go-w {open_dir}" in str(info.value)


def test_a_persist_file_planted_by_another_user_is_refused(shared_dir: pathlib.Path) -> None:
    user = _nobody()
    # nobody's file (it would be unpickled as root); a server must not even open it
    path = shared_dir / "state.db"
    server, _ = zproc.start_server(persist=path)
    stop(server)
    os.chown(path, user.pw_uid, user.pw_gid)
    with pytest.raises(PermissionError, match="owned by nobody") as info:
        zproc.start_server(persist=path)
    assert f"chown root {path}" in str(info.value)
    # the same for a WAL planted next to a file of ours
    os.chown(path, 0, 0)
    wal = pathlib.Path(f"{path}-wal")
    wal.touch()
    os.chown(wal, user.pw_uid, user.pw_gid)
    with pytest.raises(PermissionError, match="owned by nobody"):
        zproc.start_server(persist=path)


# -- ipc sockets ---------------------------------------------------------------------------


def test_an_explicit_ipc_socket_is_0600_and_refuses_another_user(
    shared_dir: pathlib.Path, open_umask: None
) -> None:
    address = (f"ipc://{shared_dir}/rr", f"ipc://{shared_dir}/ps")
    server, _ = zproc.start_server(address)
    try:
        for endpoint in address:
            assert _mode(endpoint[len("ipc://") :]) == 0o600
        if os.geteuid() == 0:

            def connect() -> None:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(f"{shared_dir}/rr")

            assert as_nobody(connect) == 13  # EACCES: the server never sees a byte
            assert zproc.ping(address, timeout=10) == server.pid  # its owner still connects
    finally:
        stop(server)


# -- keys -----------------------------------------------------------------------------------


@pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE")
def test_keygen_refuses_a_directory_others_can_write(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "keys"
    folder.mkdir()
    folder.chmod(0o777)
    done = _zproc("keygen", str(folder))
    assert done.returncode == 1, done
    assert "mode 0777" in done.stderr and f"chmod go-w {folder}" in done.stderr, done.stderr
    assert not list(folder.iterdir())
    if os.geteuid() == 0:
        user = _nobody()
        folder.chmod(0o700)
        os.chown(folder, user.pw_uid, user.pw_gid)
        done = _zproc("keygen", str(folder))
        assert done.returncode == 1 and "owned by nobody" in done.stderr, done.stderr
        assert f"chown root {folder}" in done.stderr


@pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE")
def test_key_loader_refuses_secret_files_others_can_read(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "keys"
    server_secret, client_secret = _security.create_certificates(folder)
    assert _mode(folder) == 0o700 and _mode(server_secret) == 0o600
    assert _security.server_keys(folder) is not None
    os.chmod(server_secret, 0o640)
    with pytest.raises(PermissionError, match="server's secret key file") as info:
        _security.server_keys(folder)
    assert f"chmod go-rwx {server_secret}" in str(info.value)
    assert _security.client_keys(folder) is not None  # a client never reads that file
    os.chmod(server_secret, 0o600)
    folder.chmod(0o777)
    with pytest.raises(PermissionError, match="the certificate directory"):
        _security.client_keys(folder)
    folder.chmod(0o700)
    if os.geteuid() == 0:
        user = _nobody()
        os.chown(client_secret, user.pw_uid, user.pw_gid)
        with pytest.raises(PermissionError, match="owned by nobody"):
            _security.client_keys((folder / "server.key", client_secret))
        # the server reads only client.key (the public half): still fine
        assert _security.server_keys(folder) is not None


def test_secret_key_file_others_can_read_is_refused(tmp_path: pathlib.Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    key_file.chmod(0o644)
    done = _zproc("ping", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "--secret-key-file",
                  str(key_file), "--timeout", "1")
    assert done.returncode == 1, done
    assert f"chmod go-rwx {key_file}" in done.stderr and "mode 0644" in done.stderr
    assert SECRET not in done.stderr
