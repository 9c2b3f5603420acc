"""SSHHost (hypervisor/remote.py) against a real OpenSSH server on loopback (tests/unit/sshd.py).

The server runs on this machine, so this machine's own pathlib, os.stat and locks are the
oracle: a remote path must behave as the local path of the same name does, a remote lock
must agree with a local session's lock in the same directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import paramiko
import pytest

from pytest_ostimages.errors import SessionError
from pytest_ostimages.hypervisor.host import LOCAL
from pytest_ostimages.hypervisor.remote import ChannelSocket, Destination, RemotePath, SSHHost

from .sshd import Sshd, free_port, make_key, missing, running_sshd

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    directory = tmp_path_factory.mktemp("sshd")
    # The login shell's startup files come from HOME: root's here run `pyenv init` (0.4 s a command).
    with running_sshd(directory, extra_config=[f"SetEnv HOME={directory}"]) as server:
        yield server


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sshd: Sshd) -> Path:
    """This side's HOME, its known_hosts listing the server's key; no ssh agent."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(sshd.known_hosts_line() + "\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home


@pytest.fixture
def connect(home: Path, sshd: Sshd) -> Iterator[Callable[..., SSHHost]]:
    hosts: list[SSHHost] = []

    def connect(uri: str = "", **kwargs: object) -> SSHHost:
        host = SSHHost.connect(uri or sshd.uri(), **kwargs)  # type: ignore[arg-type]
        hosts.append(host)
        return host

    yield connect
    for host in hosts:
        host.close()


@pytest.fixture
def host(connect: Callable[..., SSHHost]) -> SSHHost:
    return connect()


@pytest.fixture(scope="module")
def files_host(sshd: Sshd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHHost]:
    """One connection for the tests that only use files (a connection per test costs 0.1 s)."""
    home = tmp_path_factory.mktemp("home")
    (home / ".ssh").mkdir()
    (home / ".ssh" / "known_hosts").write_text(sshd.known_hosts_line() + "\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        patch.delenv("SSH_AUTH_SOCK", raising=False)
        host = SSHHost.connect(sshd.uri(), lock_dir=str(tmp_path_factory.mktemp("locks")))
    yield host
    host.close()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A folder to compare remote and local pathlib in: files, folders, a symlink, a dotfile."""
    root = tmp_path / "tree"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "b.qcow2").write_bytes(b"\0" * 10)
    (root / ".hidden.txt").write_text("h")
    (root / "sub" / "c.txt").write_text("gamma\n")
    (root / "sub" / "deeper" / "d.txt").write_text("delta")
    (root / "link").symlink_to("sub")
    (root / "dangling").symlink_to("nowhere")
    (root / "empty").mkdir()
    return root


def fingerprint_of(public: Path) -> str:
    return subprocess.run(["ssh-keygen", "-lf", str(public)], capture_output=True, text=True,
                          check=True).stdout.split()[1]


def gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def wait_for_file(path: Path, within: float = 5.0) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.02)
    raise AssertionError(f"{path} was not written within {within} s")


# ---------------------------------------------------------------------------------------------
# Connecting: identity and host key as libvirt's ssh transport finds them


def test_connect_with_the_uris_keyfile(host: SSHHost, sshd: Sshd) -> None:
    assert host.name == f"root@127.0.0.1:{sshd.port}"
    assert host.local is False
    assert host.run(["id", "-u"]).text.strip() == str(os.getuid())
    assert host.uid() == os.getuid()


def test_connect_with_ssh_config(home: Path, sshd: Sshd, connect: Callable[..., SSHHost]) -> None:
    (home / ".ssh" / "config").write_text(
        f"Host hypervisor\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n  IdentityFile {sshd.client_key}\n")
    host = connect("qemu+ssh://hypervisor/system")
    assert host.name == f"root@hypervisor:{sshd.port}"  # the config gave the user and port
    assert host.destination.hostname == "127.0.0.1" and host.destination.port == sshd.port
    assert host.run(["true"]).returncode == 0


def test_connect_through_a_proxy_command(home: Path, sshd: Sshd, connect: Callable[..., SSHHost]) -> None:
    """A ProxyCommand of ~/.ssh/config runs as ssh runs it (a shell's command line, %h and %p)."""
    proxy = (f"ssh -o BatchMode=yes -o UserKnownHostsFile={home}/.ssh/known_hosts -i {sshd.client_key} "
             f"-p {sshd.port} root@127.0.0.1 -W %h:%p 2>/dev/null")
    (home / ".ssh" / "config").write_text(
        f"Host viaproxy\n  HostName 127.0.0.1\n  Port {sshd.port}\n  ProxyCommand {proxy}\n")
    host = connect(f"qemu+ssh://root@viaproxy/system?keyfile={sshd.client_key}")
    assert host.run(["echo", "proxied"]).text == "proxied\n"


def test_connect_with_a_default_key(home: Path, sshd: Sshd, connect: Callable[..., SSHHost]) -> None:
    shutil.copy(sshd.client_key, home / ".ssh" / "id_ed25519")
    host = connect(f"qemu+ssh://root@127.0.0.1:{sshd.port}/system")
    assert host.run(["true"]).returncode == 0


def test_hashed_known_hosts_entries(home: Path, connect: Callable[..., SSHHost]) -> None:
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(home / ".ssh" / "known_hosts")], check=True,
                   capture_output=True)
    assert (home / ".ssh" / "known_hosts").read_text().startswith("|1|")
    assert connect().run(["true"]).returncode == 0


def test_an_unknown_host_key_is_refused(home: Path, sshd: Sshd) -> None:
    (home / ".ssh" / "known_hosts").write_text("")
    with pytest.raises(SessionError) as refused:
        SSHHost.connect(sshd.uri())
    message = str(refused.value)
    assert f"[127.0.0.1]:{sshd.port}" in message and "not known" in message
    assert fingerprint_of(sshd.host_key.with_suffix(".pub")) in message
    assert f"ssh-keyscan -p {sshd.port} -t ed25519 127.0.0.1 >> ~/.ssh/known_hosts" in message


def test_a_changed_host_key_is_refused(home: Path, sshd: Sshd, tmp_path: Path) -> None:
    other = make_key(tmp_path / "other_host_key")
    known = home / ".ssh" / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
    with pytest.raises(SessionError) as refused:
        SSHHost.connect(sshd.uri())
    message = str(refused.value)
    assert "CHANGED" in message
    assert fingerprint_of(sshd.host_key.with_suffix(".pub")) in message  # what it offers
    assert fingerprint_of(tmp_path / "other_host_key.pub") in message  # what was known
    assert f"ssh-keygen -R '[127.0.0.1]:{sshd.port}' -f {known}" in message


def test_the_global_known_hosts_file_counts(home: Path, sshd: Sshd, tmp_path: Path,
                                            connect: Callable[..., SSHHost]) -> None:
    (home / ".ssh" / "known_hosts").write_text("")
    global_file = tmp_path / "ssh_known_hosts"
    global_file.write_text(sshd.known_hosts_line() + "\n")
    (home / ".ssh" / "config").write_text(f"Host *\n  GlobalKnownHostsFile {global_file}\n")
    assert connect().run(["true"]).returncode == 0


def test_a_wrong_key_is_refused(home: Path, sshd: Sshd, tmp_path: Path) -> None:
    make_key(tmp_path / "stranger")
    with pytest.raises(SessionError) as refused:
        SSHHost.connect(sshd.uri(keyfile=tmp_path / "stranger"))
    message = str(refused.value)
    assert "refused the login as root" in message and str(tmp_path / "stranger") in message
    assert "authorized_keys" in message


def test_an_encrypted_key_says_to_use_the_agent(home: Path, sshd: Sshd, tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(tmp_path / "locked")],
                   check=True)
    with pytest.raises(SessionError, match="passphrase; load it into ssh-agent"):
        SSHHost.connect(sshd.uri(keyfile=tmp_path / "locked"))


def test_a_missing_keyfile(home: Path, sshd: Sshd, tmp_path: Path) -> None:
    with pytest.raises(SessionError, match="no such file"):
        SSHHost.connect(sshd.uri(keyfile=tmp_path / "nothing"))


def test_a_closed_port_is_refused_at_once(home: Path) -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(SessionError, match=f"127.0.0.1:{port} refused the connection. Is sshd running"):
        SSHHost.connect(f"qemu+ssh://root@127.0.0.1:{port}/system")
    assert time.monotonic() - start < 2


def test_a_silent_port_times_out(home: Path) -> None:
    with socket.socket() as silent:  # accepts (the kernel does), never greets
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.monotonic()
        with pytest.raises(SessionError, match="sent no SSH greeting.* within 1 s"):
            SSHHost.connect(f"qemu+ssh://root@127.0.0.1:{silent.getsockname()[1]}/system", timeout=1)
        assert time.monotonic() - start < 3


@pytest.mark.parametrize("uri, expected", [
    ("qemu:///system", "does not name a hypervisor across SSH"),
    ("qemu+tcp://host/system", "found the transport tcp"),
    ("qemu+ssh:///system", "names no host"),
    ("qemu+ssh://host:port/system", "port that is not a number"),
])
def test_uris_that_are_not_ssh(home: Path, uri: str, expected: str) -> None:
    with pytest.raises(SessionError, match=expected):
        Destination.from_uri(uri)


def test_destination_follows_libvirt_and_ssh(home: Path) -> None:
    (home / ".ssh" / "config").write_text("Host hv\n  User admin\n  Port 2222\n  HostKeyAlias hvkey\n")
    dest = Destination.from_uri("qemu+ssh://hv/system")
    assert (dest.user, dest.hostname, dest.port, dest.known_hosts_name) == ("admin", "hv", 2222, "hvkey")
    dest = Destination.from_uri("qemu+ssh://root@hv:22/system")  # the URI wins, as `ssh -l -p` does
    assert (dest.user, dest.port, dest.name) == ("root", 22, "root@hv")
    dest = Destination.from_uri("qemu+ssh://root@[fd00::1]:2200/system")
    assert (dest.hostname, dest.name, dest.known_hosts_name) == ("fd00::1", "root@[fd00::1]:2200", "[fd00::1]:2200")
    assert Destination.from_uri("qemu+ssh://x/system").default_keys
    (home / ".ssh" / "config").write_text("Host hv\n  ProxyJump admin@jump:2222\n")
    assert Destination.from_uri("qemu+ssh://hv/system").proxy_command == "ssh -W hv:22 ssh://admin@jump:2222"


# ---------------------------------------------------------------------------------------------
# Commands


def test_run_with_input_and_both_outputs(host: SSHHost) -> None:
    done = host.run(["sh", "-c", "cat; echo oops >&2; exit 3"], input=b"\0binary\xff" * 1000)
    assert (done.returncode, done.stdout, done.stderr) == (3, b"\0binary\xff" * 1000, "oops\n")
    assert done.argv == ("sh", "-c", "cat; echo oops >&2; exit 3")


def test_run_drains_large_outputs_without_deadlock(host: SSHHost) -> None:
    script = "head -c 3000000 /dev/zero >&2; head -c 5000000 /dev/zero; cat >/dev/null"
    done = host.run(["sh", "-c", script], input=b"x" * 3000000, timeout=60)
    assert (done.returncode, len(done.stdout), len(done.stderr)) == (0, 5000000, 3000000)


def test_run_has_a_deadline_and_kills_the_command(host: SSHHost, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 1 s"):
        host.run(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 300"], timeout=1)
    assert time.monotonic() - start < 2
    assert gone(int(wait_for_file(pid_file)))


def test_run_of_a_missing_command(host: SSHHost) -> None:
    with pytest.raises(FileNotFoundError) as missing_command:
        host.run(["no-such-tool-here", "x"])
    assert missing_command.value.filename == "no-such-tool-here"
    assert host.name in str(missing_command.value)


def test_spawn_and_kill(host: SSHHost, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    process = host.spawn(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 300"])
    pid = int(wait_for_file(pid_file))
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(0.1)
    process.kill()
    assert gone(pid)
    assert process.wait(1) == -9


def test_spawn_feeds_its_input(host: SSHHost, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    process = host.spawn(["sh", "-c", f"cat > {fifo}"], input=b"state" * 100000)
    with open(fifo, "rb") as reader:  # the feeder blocks until someone reads: as libvirt does
        assert reader.read() == b"state" * 100000
    assert process.wait(10) == 0


def test_spawned_commands_die_with_the_connection(connect: Callable[..., SSHHost], tmp_path: Path) -> None:
    host = connect()
    pid_file = tmp_path / "pid"
    host.spawn(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 300"])
    pid = int(wait_for_file(pid_file))
    host._transport.sock.shutdown(socket.SHUT_RDWR)  # the client vanishes: no goodbye
    assert gone(pid, within=10)
    with pytest.raises(SessionError, match="was lost"):
        host.run(["true"])


# ---------------------------------------------------------------------------------------------
# Files: RemotePath against pathlib on the same machine


def test_pure_path_behaviour(files_host: SSHHost) -> None:
    path = files_host.path("/var/tmp/images/debian12-base.qcow2")
    assert isinstance(path, RemotePath)
    assert (path.name, path.suffix, path.stem) == ("debian12-base.qcow2", ".qcow2", "debian12-base")
    assert str(path.parent) == "/var/tmp/images" and path.parent / path.name == path
    assert str(path.with_name("x.qcow2")) == "/var/tmp/images/x.qcow2"
    assert str(path.with_suffix(".json")) == "/var/tmp/images/debian12-base.json"
    assert hash(path) == hash(files_host.path(str(path))) and path in {files_host.path(str(path))}
    assert path != Path(str(path))  # a remote path is not this machine's
    assert sorted([files_host.path("/b"), files_host.path("/a")]) == [files_host.path("/a"), files_host.path("/b")]
    with pytest.raises(TypeError):
        open(path)  # type: ignore[call-overload]  # never a local file of the same name


def test_files_as_pathlib_sees_them(files_host: SSHHost, tree: Path) -> None:
    remote = files_host.path(tree)
    for name in ("a.txt", "sub", "link", "dangling", "nothing", "a.txt/below", "link/c.txt", "empty"):
        local, there = tree / name, remote / name
        assert (there.exists(), there.is_file(), there.is_dir(), there.is_symlink()) == \
               (local.exists(), local.is_file(), local.is_dir(), local.is_symlink()), name
    assert (remote / "a.txt").read_text() == "alpha\n"
    assert (remote / "b.qcow2").read_bytes() == b"\0" * 10
    assert sorted(p.name for p in remote.iterdir()) == sorted(p.name for p in tree.iterdir())


def test_stat_as_os_stat(files_host: SSHHost, tree: Path) -> None:
    for name in ("a.txt", "sub", "link"):
        local, there = os.stat(tree / name), (files_host.path(tree) / name).stat()
        assert (there.st_mode, there.st_uid, there.st_gid, there.st_size, there.st_mtime) == \
               (local.st_mode, local.st_uid, local.st_gid, local.st_size, int(local.st_mtime)), name
        assert there.st_mtime_ns == int(local.st_mtime) * 10**9
        assert (there.st_dev, there.st_ino, there.st_nlink) == (local.st_dev, local.st_ino, local.st_nlink)
    link = files_host.path(tree / "link").lstat()
    assert stat.S_ISLNK(link.st_mode) and link.st_ino == os.lstat(tree / "link").st_ino


# Each operation, done locally with pathlib and remotely: the same result or the same exception.
OPERATIONS: list[tuple[str, Callable[..., object]]] = [
    ("read a folder", lambda p: (p / "sub").read_text()),
    ("read a missing file", lambda p: (p / "nothing").read_bytes()),
    ("read below a file", lambda p: (p / "a.txt" / "x").read_text()),
    ("open a folder", lambda p: (p / "sub").open("rb")),
    ("write a folder", lambda p: (p / "sub").write_text("x")),
    ("write into a missing folder", lambda p: (p / "nowhere" / "x").write_text("x")),
    ("exclusive create of a file", lambda p: (p / "a.txt").open("x")),
    ("mkdir existing", lambda p: (p / "sub").mkdir()),
    ("mkdir over a file", lambda p: (p / "a.txt").mkdir()),
    ("mkdir over a file, exist_ok", lambda p: (p / "a.txt").mkdir(exist_ok=True)),
    ("mkdir existing, exist_ok", lambda p: (p / "sub").mkdir(exist_ok=True)),
    ("mkdir without parents", lambda p: (p / "x" / "y").mkdir()),
    ("mkdir below a file", lambda p: (p / "a.txt" / "y").mkdir(parents=True)),
    ("rmdir a full folder", lambda p: (p / "sub").rmdir()),
    ("rmdir a file", lambda p: (p / "a.txt").rmdir()),
    ("rmdir a missing folder", lambda p: (p / "nothing").rmdir()),
    ("unlink a folder", lambda p: (p / "sub").unlink()),
    ("unlink a missing file", lambda p: (p / "nothing").unlink()),
    ("unlink a missing file, missing_ok", lambda p: (p / "nothing").unlink(missing_ok=True)),
    ("iterdir a file", lambda p: list((p / "a.txt").iterdir())),
    ("iterdir a missing folder", lambda p: list((p / "nothing").iterdir())),
    ("stat a missing file", lambda p: (p / "nothing").stat()),
    ("stat below a file", lambda p: (p / "a.txt" / "x").stat()),
    ("lstat a dangling link", lambda p: stat.S_ISLNK((p / "dangling").lstat().st_mode)),
    ("stat a dangling link", lambda p: (p / "dangling").stat()),
    ("chmod a missing file", lambda p: (p / "nothing").chmod(0o600)),
    ("rename a missing file", lambda p: (p / "nothing").rename(p / "x")),
    ("rename a file over a full folder", lambda p: (p / "a.txt").rename(p / "sub")),
    ("rename a folder over a file", lambda p: (p / "sub").rename(p / "a.txt")),
    ("rename into a missing folder", lambda p: (p / "a.txt").rename(p / "nowhere" / "a.txt")),
    ("glob in a missing folder", lambda p: list((p / "nothing").glob("*"))),
]


@pytest.mark.parametrize("what, operation", OPERATIONS, ids=[what for what, _ in OPERATIONS])
def test_errors_as_pathlib_raises_them(files_host: SSHHost, tree: Path, what: str,
                                       operation: Callable[..., object]) -> None:
    def outcome(root: object) -> object:
        try:
            result = operation(root)
        except OSError as exc:
            return type(exc), exc.errno
        if hasattr(result, "close"):
            result.close()  # type: ignore[union-attr]
        return result

    local = outcome(tree)
    assert outcome(files_host.path(tree)) == local, what


def test_write_and_open(files_host: SSHHost, tmp_path: Path) -> None:
    path = files_host.path(tmp_path) / "state.json"
    assert path.write_text("héllo\nworld\n") == 12
    assert stat.S_IMODE(os.stat(tmp_path / "state.json").st_mode) == 0o600  # created 0600
    assert (tmp_path / "state.json").read_text() == "héllo\nworld\n"
    path.chmod(0o644)
    path.write_bytes(b"again\n")  # an existing file keeps its mode, as pathlib's
    assert stat.S_IMODE(os.stat(tmp_path / "state.json").st_mode) == 0o644
    with path.open("a") as f:
        f.write("more\n")
    with path.open() as f:
        assert list(f) == ["again\n", "more\n"]
    with path.open("r+b") as f:
        f.seek(2)
        f.write(b"AI")
        f.seek(-5, os.SEEK_END)
        assert f.read() == b"more\n"
        assert f.tell() == 11
    assert (tmp_path / "state.json").read_bytes() == b"agAIn\nmore\n"
    with (files_host.path(tmp_path) / "new").open("xb") as f:
        f.write(b"\0" * 200000)
    assert (tmp_path / "new").read_bytes() == b"\0" * 200000


def test_folders_rename_and_remove(files_host: SSHHost, tmp_path: Path) -> None:
    root = files_host.path(tmp_path)
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c").mkdir(parents=True, exist_ok=True)
    assert (tmp_path / "a" / "b" / "c").is_dir()
    (root / "one").write_text("1")
    (root / "two").write_text("2")
    assert (root / "one").replace(root / "two") == root / "two"  # over an existing file
    assert (tmp_path / "two").read_text() == "1" and not (tmp_path / "one").exists()
    (root / "two").rename(str(tmp_path / "three"))
    assert (tmp_path / "three").read_text() == "1"
    (root / "three").unlink()
    (root / "a" / "b" / "c").rmdir()
    assert not (tmp_path / "a" / "b" / "c").exists()


def test_glob_as_pathlib(files_host: SSHHost, tree: Path) -> None:
    remote = files_host.path(tree)
    for pattern in ("*.txt", "*", "sub/*.txt", "*/*.txt", "**/*.txt", "**", "*/deeper/*", "a.txt",
                    "nothing", "[ab].*", "?.txt", "link/*"):
        assert sorted(str(p) for p in remote.glob(pattern)) == sorted(str(p) for p in tree.glob(pattern)), pattern
    assert sorted(str(p) for p in remote.rglob("*.txt")) == sorted(str(p) for p in tree.rglob("*.txt"))


def test_copyfile_is_sparse_and_private(host: SSHHost, tmp_path: Path) -> None:
    source = tmp_path / "disk.raw"
    with open(source, "wb") as f:
        f.write(b"head")
        f.truncate(64 * 2**20)
    source.chmod(0o444)
    host.copyfile(host.path(source), host.path(tmp_path / "copy.raw"))
    copy = os.stat(tmp_path / "copy.raw")
    assert (copy.st_size, stat.S_IMODE(copy.st_mode)) == (64 * 2**20, 0o600)
    assert copy.st_blocks * 512 < 2**20  # sparse, not 64 MiB written
    with pytest.raises(FileNotFoundError):
        host.copyfile(tmp_path / "nothing", tmp_path / "copy2")


def test_chown_acl_fifo_rmtree(host: SSHHost, tmp_path: Path) -> None:
    path = tmp_path / "owned"
    path.write_text("x")
    host.chown(host.path(path), 1, -1)
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (1, os.getgid())
    host.chown(path, -1, 2)
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (1, 2)
    fifo = host.path(tmp_path) / "state.fifo"
    host.mkfifo(fifo)
    assert stat.S_ISFIFO(os.stat(tmp_path / "state.fifo").st_mode)
    assert stat.S_IMODE(os.stat(tmp_path / "state.fifo").st_mode) == 0o600
    with pytest.raises(FileExistsError):
        host.mkfifo(fifo)
    (tmp_path / "tree" / "deep").mkdir(parents=True)
    (tmp_path / "tree" / "deep" / "f").write_text("x")
    host.rmtree(host.path(tmp_path / "tree"))
    host.rmtree(tmp_path / "tree")  # gone already: no error
    assert not (tmp_path / "tree").exists()
    with pytest.raises(ValueError):
        host.rmtree("/")  # type: ignore[arg-type]


@pytest.mark.skipif(shutil.which("getfacl") is None, reason="needs setfacl and getfacl (Debian package acl)")
def test_reader_acl_as_the_local_one(host: SSHHost, tmp_path: Path) -> None:
    remote, local = tmp_path / "remote.qcow2", tmp_path / "local.qcow2"
    for path in (remote, local):
        path.write_text("x")
        path.chmod(0o600)
    host.set_reader_acl(host.path(remote), 64055)
    LOCAL.set_reader_acl(local, 64055)
    assert os.getxattr(remote, "system.posix_acl_access") == os.getxattr(local, "system.posix_acl_access")
    with pytest.raises(FileNotFoundError):
        host.set_reader_acl(tmp_path / "nothing", 64055)


# ---------------------------------------------------------------------------------------------
# Locks: held there, shared with that machine's own sessions, gone with the client


def test_locks_exclude_across_clients(connect: Callable[..., SSHHost], own_lock_dir: Path) -> None:
    first, second = connect(), connect()
    taken = threading.Event()
    with first.lock("subnets"):
        with second.lock_if_free("subnets") as free:
            assert not free

        def wait_for_it() -> None:
            with second.lock("subnets"):
                taken.set()

        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        assert not taken.wait(1.0)
    assert taken.wait(10)
    waiter.join()
    with second.lock_if_free("subnets") as free:
        assert free
    lock_file = own_lock_dir / "subnets.lock"
    assert stat.S_IMODE(lock_file.stat().st_mode) == 0o666


def test_remote_and_local_sessions_agree(host: SSHHost) -> None:
    with LOCAL.lock("warm-abc"):
        with host.lock_if_free("warm-abc") as free:
            assert not free
    with host.lock("warm-abc"):
        with LOCAL.lock_if_free("warm-abc") as free:
            assert not free
    with LOCAL.lock_if_free("warm-abc") as free:
        assert free


def test_a_vanished_client_releases_its_locks(connect: Callable[..., SSHHost]) -> None:
    first, second = connect(), connect()
    held = first.lock("reuse-1")
    held.__enter__()
    with second.lock_if_free("reuse-1") as free:
        assert not free
    first._transport.sock.shutdown(socket.SHUT_RDWR)  # no goodbye, no release
    start = time.monotonic()
    with second.lock("reuse-1"):
        assert time.monotonic() - start < 10


def test_any_slot(connect: Callable[..., SSHHost]) -> None:
    first, second = connect(), connect()
    abort = threading.Event()
    with first.any_slot("boot-slot", 2, abort) as waited:
        assert waited < 5
        with second.any_slot("boot-slot", 2, abort):
            with LOCAL.lock_if_free("boot-slot-0") as free0, LOCAL.lock_if_free("boot-slot-1") as free1:
                assert not free0 and not free1  # both taken, one by each
            threading.Timer(0.5, abort.set).start()
            start = time.monotonic()
            with pytest.raises(InterruptedError):
                with first.any_slot("boot-slot", 2, abort):
                    pass
            assert 0.4 < time.monotonic() - start < 3
    abort.clear()
    with second.any_slot("boot-slot", 1, abort) as waited:  # the interrupted waiter holds nothing
        assert waited < 2


def test_a_lock_directory_that_is_a_file(connect: Callable[..., SSHHost], tmp_path: Path) -> None:
    from pytest_ostimages.errors import OstError

    (tmp_path / "locks").write_text("")
    host = connect(lock_dir=str(tmp_path / "locks"))
    with pytest.raises(OstError, match="should be a directory for pytest-ostimages' lock files"):
        with host.lock("x"):
            pass


def test_lock_names_are_file_names(host: SSHHost) -> None:
    with pytest.raises(ValueError):
        with host.lock("../etc/passwd"):
            pass


def test_a_symlinked_lock_file_is_refused(host: SSHHost, own_lock_dir: Path) -> None:
    (own_lock_dir / "trap.lock").symlink_to("/etc/passwd")
    from pytest_ostimages.errors import OstError

    with pytest.raises(OstError, match="is a symlink; pytest-ostimages never follows one"):
        with host.lock("trap"):
            pass


# ---------------------------------------------------------------------------------------------
# Guests: through the hypervisor's sshd


def test_guest_socket_is_a_socket_for_paramiko(host: SSHHost, sshd: Sshd) -> None:
    sock = host.guest_socket("127.0.0.1", sshd.port, 5)
    assert isinstance(sock, ChannelSocket)
    sock.settimeout(5)
    assert sock.recv(4, socket.MSG_PEEK) == b"SSH-"  # a readiness probe's peek: read again below
    nested = paramiko.SSHClient()
    nested.set_missing_host_key_policy(paramiko.RejectPolicy())
    nested.get_host_keys().add(f"[127.0.0.1]:{sshd.port}", "ssh-ed25519",
                               paramiko.Ed25519Key(data=_key_blob(sshd.host_key_line)))
    nested.connect("127.0.0.1", sshd.port, "root", key_filename=str(sshd.client_key), sock=sock,
                   allow_agent=False, look_for_keys=False, timeout=10)
    try:
        _, out, _ = nested.exec_command("echo nested")
        assert out.read() == b"nested\n"
    finally:
        nested.close()


def _key_blob(line: str) -> bytes:
    import base64

    return base64.b64decode(line.split()[1])


def test_openssh_reaches_guests_through_the_jump(host: SSHHost, sshd: Sshd, home: Path) -> None:
    """host.jump: the ProxyCommand by which this machine's OpenSSH (ansible, testinfra) reaches a
    guest; here the "guest" is the sshd itself, reached through itself."""
    assert host.jump is not None and "-W '[%h]:%p'" in host.jump
    done = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={home}/.ssh/known_hosts",
                           "-o", f"ProxyCommand={host.jump}", "-i", str(sshd.client_key), "-p", str(sshd.port),
                           "root@127.0.0.1", "echo", "through"], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, "through\n"), done.stderr


def test_default_root(host: SSHHost) -> None:
    assert str(host.default_root()) == f"/var/tmp/pytest-ostimages-{host.user}"


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_guest_socket_reaches_a_listener(host: SSHHost, address: str) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        listener = socket.socket(family)
        listener.bind((address, 0))
    except OSError:
        pytest.skip(f"no {address} here")
    with listener:
        listener.listen()
        sock = host.guest_socket(address, listener.getsockname()[1], 5)
        assert sock is not None
        accepted, _ = listener.accept()
        with accepted, sock:
            accepted.sendall(b"hello")
            sock.settimeout(5)
            assert sock.recv(5) == b"hello"
            sock.sendall(b"back")
            assert accepted.recv(4) == b"back"


def test_guest_socket_to_nothing_is_none_at_once(host: SSHHost, caplog: pytest.LogCaptureFixture) -> None:
    start = time.monotonic()
    assert host.guest_socket("127.0.0.1", free_port(), 5) is None
    assert time.monotonic() - start < 1
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # a guest not up yet is no error


# ---------------------------------------------------------------------------------------------
# Threads: the plugin boots VMs in threads, all on one connection


def test_threads_share_the_connection(host: SSHHost, tmp_path: Path, sshd: Sshd) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            folder = host.path(tmp_path) / f"t{n}"
            folder.mkdir()
            for i in range(15):
                (folder / f"{i}.txt").write_text(f"{n}-{i}" * 1000)
                assert (folder / f"{i}.txt").read_text() == f"{n}-{i}" * 1000
                assert (folder / f"{i}.txt").stat().st_size == len(f"{n}-{i}") * 1000
            assert len(list(folder.glob("*.txt"))) == 15
            sock = host.guest_socket("127.0.0.1", sshd.port, 5)
            assert sock is not None
            sock.close()
            assert host.run(["echo", str(n)]).text == f"{n}\n"
            with host.lock(f"thread-{n % 2}"):
                pass
        except BaseException as exc:  # noqa: B036 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors


def test_more_commands_than_sshd_allows_sessions(host: SSHHost, tmp_path: Path) -> None:
    """OpenSSH's MaxSessions is 10 a connection: with the lock agent and SFTP open, 16 commands at
    once take turns instead of failing."""
    results: list[object] = []

    def sleep() -> None:
        try:
            results.append(host.run(["sleep", "0.3"]).returncode)
        except Exception as exc:  # reported below
            results.append(exc)

    with host.lock("busy"):
        (host.path(tmp_path) / "f").write_text("x")
        threads = [threading.Thread(target=sleep) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert results == [0] * 16
