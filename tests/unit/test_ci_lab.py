""".ci/lab never destroys another run's lab, nor a process it did not start.

Only one libvirtd may run on a machine, and this one's runs already: .ci/lab starts stub
daemons here (scripts that wait until they are stopped; the stub libvirtd starts a stub
dnsmasq, as libvirt does for a network) with a stub virsh, found first on PATH, each test
in a network namespace of its own name. LAB_LIBVIRTD_NAMES and LAB_VIRTLOGD_NAMES (see
.ci/lab's header) keep the machine's real daemons from counting as foreign ones here.
tests/e2e/test_lab.py shows that the real daemon is left alone.

The script runs from a copy of .ci/ without .venv: down's plugin cleanup would otherwise
reach the machine's real libvirtd through its socket.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

LAB = Path(__file__).resolve().parents[2] / ".ci" / "lab"
STATE = Path("/run/pytest-ostimages-lab")

pytestmark = pytest.mark.skipif(os.getuid() != 0 or shutil.which("ip") is None,
                                reason=".ci/lab needs root and ip (network namespaces)")

DAEMON = f"""#!{sys.executable}
import os, signal, subprocess, sys
here = os.path.dirname(sys.argv[0])
if os.path.basename(sys.argv[0]) == "libvirtd":  # as libvirt starts dnsmasq for a network
    subprocess.Popen([os.path.join(here, "dnsmasq")], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
signal.pause()
"""


@dataclasses.dataclass
class Lab:
    name: str
    script: Path
    stubs: Path
    env: dict[str, str]

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.script), *args], env=self.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=60)

    def daemons(self) -> dict[int, str]:
        """The stub processes that run now: pid -> name."""
        found = {}
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            for arg in argv[:2]:  # the interpreter, then the script
                if arg.decode(errors="replace").startswith(f"{self.stubs}/"):
                    found[int(proc.name)] = Path(arg.decode()).name
        return found

    def started(self) -> dict[int, str]:
        """The stubs of a lab that is up: its daemons, and the dnsmasq its libvirtd starts."""
        # until each is there, and only once: the stub libvirtd's child is "libvirtd" too between its
        # fork and its exec of dnsmasq (three processes, not yet these three, one run in 30 under load)
        expected = ["dnsmasq", "libvirtd", "virtlogd"]
        deadline = time.monotonic() + 10
        while sorted(self.daemons().values()) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        daemons = self.daemons()
        assert sorted(daemons.values()) == expected
        return daemons


def namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    tree = tmp_path / "tree"
    (tree / ".ci").mkdir(parents=True)
    shutil.copy(LAB, tree / ".ci" / "lab")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in (("libvirtd", DAEMON), ("virtlogd", DAEMON), ("dnsmasq", DAEMON),
                       ("virsh", "#!/bin/sh\necho 'Compiled against library: libvirt 9.0.0'\n")):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}",
           "LAB_LIBVIRTD_NAMES": "labtest-none", "LAB_VIRTLOGD_NAMES": "labtest-none"}
    made = Lab(f"labtest-{secrets.token_hex(3)}", tree / ".ci" / "lab", stubs, env)
    yield made
    # whatever the test left: its lab, its stubs, its namespace and state (all named for it)
    made("down", made.name)
    for pid in made.daemons():
        os.kill(pid, signal.SIGKILL)
    if made.name in namespaces():
        subprocess.run(["ip", "netns", "del", made.name], check=True)
    shutil.rmtree(STATE / made.name, ignore_errors=True)


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[Any]]]:
    """Processes a test starts itself; killed at its end."""
    processes: list[subprocess.Popen[Any]] = []
    yield processes
    for process in processes:
        process.kill()
        process.wait()


def test_a_second_up_of_one_name_is_refused_and_the_first_lab_runs_on(lab: Lab) -> None:
    first = lab("up", lab.name)
    assert first.returncode == 0, first.stderr
    daemons = lab.started()
    for args in (("up", lab.name), ("run", lab.name, "--", "true")):
        second = lab(*args)
        assert second.returncode == 1
        assert f"the lab '{lab.name}' is up already" in second.stderr
        assert f".ci/lab down {lab.name}" in second.stderr
    assert all(alive(pid) for pid in daemons) and lab.name in namespaces()
    down = lab("down", lab.name)
    assert down.returncode == 0, down.stderr
    assert lab.daemons() == {} and lab.name not in namespaces() and not (STATE / lab.name).exists()


def test_a_stale_lab_is_taken_down_by_the_next_up_and_a_reused_pid_never_killed(lab: Lab,
                                                             started: list[subprocess.Popen[Any]]) -> None:
    unrelated = subprocess.Popen(["sleep", "1000"])
    started.append(unrelated)
    pid = unrelated.pid
    # a private /run: the daemons' pidfiles and the lab's records name the unrelated sleep,
    # without touching the real ones
    script = f"""set -eu
        mount -t tmpfs lab-test /run
        echo {pid} >/run/libvirtd.pid
        echo {pid} >/run/virtlogd.pid
        mkdir -p {STATE}/{lab.name}
        echo "{pid} 1" >{STATE}/{lab.name}/libvirtd  # a daemon's record whose pid was reused since
        ip netns add {lab.name}; : >{STATE}/{lab.name}/netns  # the namespace it made, left behind
        {lab.script} up {lab.name}  # takes the stale lab down first, then comes up
        {lab.script} down {lab.name}
        """
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            env=lab.env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"the lab '{lab.name}' was not taken down" in result.stderr
    assert "taking down what it recorded first" in result.stderr
    assert alive(pid) and lab.daemons() == {} and lab.name not in namespaces()


def test_down_stops_what_the_lab_started_and_leaves_a_stranger_in_its_namespace(
        lab: Lab, started: list[subprocess.Popen[Any]]) -> None:
    assert lab("up", lab.name).returncode == 0
    daemons = lab.started()
    stranger = subprocess.Popen(["ip", "netns", "exec", lab.name, "sleep", "1000"])
    started.append(stranger)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{stranger.pid}/comm").read_text().strip() != "sleep" and time.monotonic() < deadline:
        time.sleep(0.05)  # until ip has entered the namespace and become sleep
    down = lab("down", lab.name)
    assert down.returncode == 0, down.stderr
    assert not any(alive(pid) for pid in daemons), "the lab's daemons, and its libvirtd's dnsmasq, are stopped"
    assert alive(stranger.pid)
    assert f"left running in namespace {lab.name}, not started by .ci/lab: {stranger.pid} sleep 1000" in down.stderr
    assert lab.name not in namespaces()  # the lab created it


def test_run_takes_down_what_it_made_when_the_command_fails(lab: Lab) -> None:
    result = lab("run", lab.name, "--", "sh", "-c", "exit 3")
    assert result.returncode == 3, result.stderr
    assert lab.daemons() == {} and lab.name not in namespaces() and not (STATE / lab.name).exists()


def test_two_runs_of_one_name_never_both_proceed(lab: Lab, tmp_path: Path,
                                                 started: list[subprocess.Popen[str]]) -> None:
    done = tmp_path / "done"
    first = subprocess.Popen([str(lab.script), "run", lab.name, "--", "sh", "-c",
                              f"while [ ! -e {done} ]; do sleep 0.1; done"], env=lab.env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started.append(first)
    try:
        daemons = lab.started()
        for args in (("run", lab.name, "--", "true"), ("up", lab.name), ("down", lab.name)):
            other = lab(*args)
            assert other.returncode == 1
            assert f"another .ci/lab up, down or run of '{lab.name}' is under way" in other.stderr
        assert all(alive(pid) for pid in daemons)
    finally:
        done.touch()
        _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert lab.daemons() == {} and lab.name not in namespaces()


def test_a_namespace_the_lab_did_not_create_is_refused_and_kept(lab: Lab) -> None:
    subprocess.run(["ip", "netns", "add", lab.name], check=True)  # someone's (the fixture deletes it)
    up = lab("up", lab.name)
    assert up.returncode == 1
    assert f"a network namespace '{lab.name}' exists, and .ci/lab did not create it" in up.stderr
    down = lab("down", lab.name)
    assert down.returncode == 0 and "nothing to take down" in down.stdout
    assert lab.name in namespaces() and lab.daemons() == {} and not (STATE / lab.name).exists()
