"""SSH commands against a real OpenSSH sshd on loopback: a timeout is a deadline for the
whole command, an abort event or Ctrl-C stops it, and nothing is left behind."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from pytest_ostimages.errors import OstError
from pytest_ostimages.guest.keys import public_key
from pytest_ostimages.guest.ssh import SSH, load_key

from . import sshd

TICKING = "while :; do echo x; sleep 0.25; done"  # prints while it waits, like cloud-init status --wait


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sshd.Sshd]:
    """A real OpenSSH sshd of the test's own on 127.0.0.1 (stopped with its sessions afterwards)."""
    why = sshd.missing()
    if why is not None:
        pytest.skip(why)
    with sshd.running_sshd(tmp_path_factory.mktemp("sshd")) as running:
        yield running


@pytest.fixture
def ssh(server: sshd.Sshd) -> Iterator[SSH]:
    connection = SSH(server.address, load_key(server.client_key), port=server.port,
                     host_key=public_key(server.host_key_line))
    connection.run("true")  # connected: the paramiko transport's own thread runs from here on
    yield connection
    connection.close()


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[threading.ExceptHookArgs]:
    """Exceptions that ended a thread (none must)."""
    errors: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    return errors


def test_a_timeout_limits_the_whole_command(ssh: SSH, thread_errors: list) -> None:
    threads = threading.active_count()
    start = time.monotonic()
    with pytest.raises(OstError, match="did not finish within 1 s"):
        ssh.run(TICKING, timeout=1)
    assert time.monotonic() - start < 3
    assert threading.active_count() == threads  # no reader thread left behind
    time.sleep(0.5)
    assert not thread_errors  # nor one that died


def ended(ssh: SSH, command: str) -> bool:
    """Whether no process runs `command` (its whole command line) there any more, within 5 s."""
    return ssh.run(f"for i in $(seq 50); do pgrep -fx '{command}' >/dev/null || exit 0; sleep 0.1; done; exit 1",
                   timeout=30).returncode == 0


def test_the_connection_is_still_usable_after_a_timeout(ssh: SSH) -> None:
    client = ssh.connect()
    with pytest.raises(OstError, match="it was ended there"):
        ssh.run("sleep 30.1", timeout=0.5)  # writes nothing: closing its channel alone would leave it running
    assert ended(ssh, "sleep 30.1")
    assert ssh.run("echo still here", timeout=10).stdout == "still here\n"
    assert ssh.connect() is client  # the same connection: only the command's channel was closed


def test_what_a_command_leaves_running_stays_and_its_stdin_is_empty(ssh: SSH, tmp_path: Path) -> None:
    done = ssh.run("cat; setsid -f sleep 30.4 >/dev/null 2>&1; sleep 30.5 >/dev/null 2>&1 & echo started",
                   timeout=10)
    try:
        assert done.stdout == "started\n"  # cat read an empty stdin, as the guest's commands all do
        time.sleep(1)  # the channel is closed: nothing is ended for it
        assert not ended(ssh, "sleep 30.5") and not ended(ssh, "sleep 30.4")
    finally:
        ssh.run("pkill -fx 'sleep 30.[45]'", timeout=10)


def test_large_stdout_and_stderr_are_both_collected(ssh: SSH) -> None:
    # more than paramiko's 2 MiB channel window on each: a reader of one stream only would hang
    result = ssh.run("head -c 3000000 /dev/zero | tr '\\0' e >&2; head -c 3000000 /dev/zero | tr '\\0' o; "
                     "for i in $(seq 1000); do echo out$i; echo err$i >&2; done; exit 3", timeout=30)
    assert result.returncode == 3
    assert result.stdout.startswith("o" * 3000000 + "out1\n") and result.stdout.endswith("out1000\n")
    assert result.stderr.startswith("e" * 3000000 + "err1\n") and result.stderr.endswith("err1000\n")


def test_lines_reach_on_line_while_the_command_runs(ssh: SSH, tmp_path: Path) -> None:
    go = tmp_path / "go"
    seen: list[str] = []

    def on_line(line: str) -> None:
        seen.append(line)
        go.touch()  # the command waits for this: it can only end if the line came before

    result = ssh.stream(f"echo 'first ünïcode'; while [ ! -e {go} ]; do sleep 0.05; done; printf 'last'",
                        on_line, timeout=10)
    assert seen == ["first ünïcode", "last"]
    assert result.stdout == "first ünïcode\nlast"


def test_setting_abort_stops_a_command(ssh: SSH, thread_errors: list) -> None:
    ssh.abort = threading.Event()
    threads = threading.active_count()
    interrupt = threading.Timer(0.5, ssh.abort.set)  # as the booter does on Ctrl-C
    interrupt.start()
    start = time.monotonic()
    try:
        with pytest.raises(OstError, match="interrupted"):
            ssh.run("sleep 30.2", timeout=None)
    finally:
        interrupt.join()
    assert time.monotonic() - start < 3
    ssh.abort = None
    assert ended(ssh, "sleep 30.2")
    assert threading.active_count() == threads
    assert not thread_errors


@pytest.mark.timeout(60)  # a regression must not hang the run: the command itself never ends
def test_ctrl_c_interrupts_a_command(ssh: SSH) -> None:
    # SIGINT raises KeyboardInterrupt, as in a terminal, even when this run inherited it ignored
    # (started in the background by a non-interactive shell, or under nohup, as CI runners may)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    ctrl_c = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))  # KeyboardInterrupt in the main thread
    ctrl_c.start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            ssh.run("sleep 30.3 | cat", timeout=None)  # every process of the command ends
    finally:
        ctrl_c.join()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 3
    assert ended(ssh, "sleep 30.3")
    assert ssh.run("echo after", timeout=10).stdout == "after\n"


def test_no_deadline_waits_for_the_end(ssh: SSH) -> None:
    result = ssh.run("sleep 1.5; echo done; echo oops >&2; exit 7", timeout=None)
    assert (result.returncode, result.stdout, result.stderr) == (7, "done\n", "oops\n")


def test_the_deadline_covers_reconnecting(ssh: SSH) -> None:
    ssh.close()  # the next command connects first, within its deadline
    start = time.monotonic()
    with pytest.raises(OstError, match="did not finish within 1 s"):
        ssh.run(TICKING, timeout=1)
    assert time.monotonic() - start < 3
