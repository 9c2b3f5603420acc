#!/usr/bin/env python3
"""Benchmarks of pytest-ostimages, each beside a baseline measured in the same run.

    .ci/lab run -- python bench/run.py [--repeat 3] [--only boot parallel ...] [--json FILE]

Prints a table (min / median of --repeat runs) and writes the raw figures as JSON.
It never fails because of a time: it only measures.

Figures:
  boot       the plugin hands over an SSH-ready VM  vs  a hand-written sequence
             (qemu-img create, virsh create of the same domain XML, poll port 22
             every 50 ms) on the same image, network template and settings
  parallel   1..4 VMs and engine + 2 hosts booted together  vs  one VM alone and
             the same VMs booted one after another
  overlay    time and bytes to create an overlay, on two images of different size
  readiness  sshd listening (guest journal, clock offset measured over SSH)  ->
             the plugin declaring the VM ready
  teardown   removing everything of a session
  revert     clean_vm: back to the just-booted state (snapshot revert)  vs  a boot
  reuse      a session with --ost-reuse that attaches  vs  the first one, which boots
  suite      examples/basic_suite with -n 0 and -n 2
  identity   boot to ready with --ost-identity=auto (own machine-id, host key,
             hostname)  vs  keep (the image's)
  warm       engine + 2 hosts restored from saved states  vs  booted; the example
             suite in a cold session after a first run  vs  that first run
  inside     --ost-run-inside on examples/inside: command -> first inner result,
             tree shared over virtiofs  vs  copied
  ost        the OST example topology (engine, 2 hosts, storage with 2 disks; 2
             networks) booted and deployed  vs  the same VMs booted without
             their deploy scripts
  uefi       boot to ready of debian12efi's base under UEFI  vs  its BIOS twin (the
             same guest); a UEFI guest restored  vs  booted
  warm-nm    engine + 2 hosts on NetworkManager guests (debian12efi) restored  vs
             booted
  warm-ost   the example OST topology ready and deployed, restored  vs  booted +
             deployed; its checkpoint fixture restored  vs  run, and  vs  restoring
             the VMs alone; 2 and 4 sessions restoring one state at once  vs  one
  remote     one VM through qemu+ssh:// (a hypervisor namespace with an sshd on this
             machine, tests/e2e/remote.py)  vs  the local URI: boot to ready, an SSH
             command's round trip through the hypervisor  vs  direct, a warm restore
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pytest_ostimages.config import OstConfig, from_environment  # noqa: E402
from pytest_ostimages import Lab, VMSpec  # noqa: E402
from pytest_ostimages.ost import deploy as ost  # noqa: E402
from pytest_ostimages.ost import initconfig  # noqa: E402
from pytest_ostimages.lab.lab import OstDeployment, Roots, Run  # noqa: E402
from pytest_ostimages.hypervisor.host import LOCAL  # noqa: E402
from pytest_ostimages.lab.networks import with_free_subnet  # noqa: E402
from pytest_ostimages.guest.ssh import SSH  # noqa: E402
from pytest_ostimages.guest.vm import JOURNAL  # noqa: E402
from pytest_ostimages.hypervisor import connection as virt  # noqa: E402
from pytest_ostimages.hypervisor.render import HostEntry, Templates, domain_xml, network_xml  # noqa: E402
from pytest_ostimages.images.catalog import Image  # noqa: E402
from pytest_ostimages.state.ledger import Ledger  # noqa: E402
from pytest_ostimages.parallel import each  # noqa: E402
from pytest_ostimages.waiting import poll  # noqa: E402

MEMORY, VCPUS = 512, 1
LAYER = "engine-installed"
# the project's BIOS test images (as pytest.ini's ost_distro for the suites run here); boots unless said
SETTINGS = {"ost_distro": "debian12", "ost_memory": str(MEMORY), "ost_vcpus": str(VCPUS), "ost_warm": "off"}


# Deadlines: nothing here waits for ever. A VM's own boot is bounded by the plugin's --ost-boot-timeout.
SESSION_TIMEOUT = 1800.0  # seconds a pytest session of a figure may take (an OST boot + deploy takes minutes)
STOP_GRACE = 120.0  # seconds a session stopped at its deadline (SIGTERM) has to remove its VMs before SIGKILL
TOOL_TIMEOUT = 300.0  # seconds for qemu-img / qemu-io (writing 1 GiB included)


def config(**settings: str) -> OstConfig:
    return from_environment({**SETTINGS, **settings})


def tool(command: list[str]) -> None:
    """Run qemu-img or qemu-io, within TOOL_TIMEOUT s; SystemExit saying what failed."""
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{' '.join(command)} did not finish within {TOOL_TIMEOUT:.0f} s: is the disk "
                         f"under /var/tmp very slow, or full?") from None
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"{' '.join(command)} failed with exit code {exc.returncode}: {exc.stderr.strip()}") from None


def session(command: list[str], what: str, check: bool = True, timeout: float = SESSION_TIMEOUT,
            on_line: Callable[[str], None] = lambda line: None) -> subprocess.CompletedProcess:
    """Run `command`, a pytest session, in ROOT; its output (stdout and stderr) goes to `on_line`
    line by line as it comes. `check`: a session that fails ends the benchmarks (SystemExit).

    `timeout` is a deadline for the whole session: then it gets SIGTERM (the plugin removes its
    VMs), STOP_GRACE s later SIGKILL (its VMs stay, labelled: `pytest --ost-cleanup` removes them).
    An interrupt (Ctrl-C) stops it the same way.
    """
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    expired = threading.Event()

    def stop() -> None:
        expired.set()
        proc.terminate()

    timers = [threading.Timer(timeout, stop), threading.Timer(timeout + STOP_GRACE, proc.kill)]
    for timer in timers:
        timer.start()
    lines: list[str] = []
    try:
        for line in proc.stdout or []:
            lines.append(line)
            on_line(line)
        proc.wait()
    finally:
        for timer in timers:
            timer.cancel()
        if proc.poll() is None:  # interrupted while it runs
            proc.terminate()
            try:
                proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    output = "".join(lines)
    if expired.is_set():
        raise SystemExit(f"{what} did not finish within {timeout:.0f} s and was stopped; if it left VMs, "
                         f"`pytest --ost-cleanup` removes them. Its last lines:\n{output[-3000:]}")
    if check and proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit code {proc.returncode}): {' '.join(command)}\n{output[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, output)


def stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "runs": values}


# --- the plugin ------------------------------------------------------------------------


def restore_steps(line: str) -> None:
    """The plugin's progress line of each warm restore, with its steps' seconds."""
    if ": restored " in line:
        print(f"    {line}", flush=True)


def plugin_boot(specs: list[VMSpec], **settings: str) -> dict[str, Any]:
    """Boot `specs` with the plugin; time to ready, readiness latency and teardown."""
    lab = Lab(config(**settings), progress=restore_steps)
    start = time.monotonic()
    start_wall = time.time()
    try:
        vms = lab.boot(specs)
        ready = time.monotonic() - start
        ready_wall = start_wall + ready
        latencies = [readiness_latency(vm, ready_wall) for vm in vms]
        logins = [login_cost(vm) for vm in vms]
    finally:
        t0 = time.monotonic()
        lab.close()
        teardown = time.monotonic() - t0
    return {"ready": ready, "latency": max(latencies), "login": min(logins), "teardown": teardown,
            "per_vm": {vm.role: vm.boot_seconds for vm in vms}}


def login_cost(vm) -> float:
    """Seconds for a fresh SSH login to the booted, idle VM (what any readiness check pays)."""
    fresh = SSH(str(vm.ip), vm._ssh.key)
    t0 = time.monotonic()
    fresh.connect()
    elapsed = time.monotonic() - t0
    fresh.close()
    return elapsed


def readiness_latency(vm, ready_wall: float) -> float:
    """Seconds from sshd listening (guest journal) to the plugin's 'ready' (host clock)."""
    before = time.time()
    guest_now = float(vm.ssh("date +%s.%N").stdout)
    after = time.time()
    offset = guest_now - (before + after) / 2  # guest clock minus host clock, +- RTT/2
    line = vm.ssh(f"{JOURNAL} -o short-unix -u ssh | grep -m1 'Server listening'").stdout
    if not line.split():
        return float("nan")  # no such journal line (another image's sshd unit)
    listening_guest = float(line.split()[0])
    return ready_wall - (listening_guest - offset)


# --- the baseline: what a person would write by hand ---------------------------------------

class Baseline:
    """VMs booted by hand on a network of its own: qemu-img create, createXML of the plugin's
    domain XML, poll port 22 every 50 ms.

    Its network, domains and folder are what a run of the plugin makes (bench/run.py's own run):
    recorded in a ledger before they exist and labelled with this process as their owner, so that
    close() removes them (each label checked first) and, after a crash, the next session or
    `pytest --ost-cleanup` does.
    """

    def __init__(self, settings: OstConfig, image: Image, virt_type: str, cpu_mode: str,
                 templates: Templates, count: int = 4) -> None:
        self.settings, self.image, self.virt_type, self.cpu_mode = settings, image, virt_type, cpu_mode
        self.templates = templates
        root = settings.workdir  # the baseline runs here, on this machine's libvirt
        self.run = Run.new(secrets.token_hex(4), Roots(root, root, settings.warm_root, root / "layers"), LOCAL)
        self.name = f"ostb-{self.run.run_id}"  # the network and its bridge (at most 15 characters)
        self.ledger = Ledger()
        self.conn = virt.connect(settings.libvirt_uri)
        try:
            self.ledger.record("workdir", str(self.run.workdir.path), self.run.owner)
            self.run.workdir.create(self.run.owner)
            self.slots: list[HostEntry] = []
            with_free_subnet(self.conn, settings.subnet_pool, lambda subnet: self._network(subnet, count))
        except BaseException:
            self.close()
            raise

    def _network(self, subnet: ipaddress.IPv4Network, count: int) -> None:
        self.slots = [HostEntry(f"vm{i}", f"52:54:00:fa:00:{i:02x}", subnet.network_address + 10 + i)
                      for i in range(count)]
        xml = network_xml(self.templates.load("network.xml"), name=self.name, bridge=self.name, subnet=subnet,
                          domain=self.settings.dns_domain, hosts=self.slots, label=self.run.owner)
        self.ledger.record("network", self.name, self.run.owner)  # before it exists: see Lab
        virt.create_network(self.conn, xml)

    def boot(self, count: int = 1) -> float:
        """Boot `count` VMs together by hand; seconds until every port 22 accepts."""
        start = time.monotonic()
        names = []
        try:
            for i, slot in enumerate(self.slots[:count]):
                name = f"{self.name}-{i}"
                overlay = self.run.workdir.path / f"{name}.qcow2"
                overlay.unlink(missing_ok=True)
                tool(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(self.image.path),
                      str(overlay)])
                xml = domain_xml(self.templates.load("domain.xml"), name=name, virt_type=self.virt_type,
                                 cpu_mode=self.cpu_mode, memory_mib=MEMORY, vcpus=VCPUS, disk=overlay,
                                 backing=list(zip(self.image.chain, self.image.chain_formats)),
                                 nics=[(self.name, slot.mac)], console_log=self.console(name),
                                 label=self.run.owner.with_role(slot.name))
                self.ledger.record("domain", name, self.run.owner)
                names.append(name)
                self.conn.createXML(xml)
            pending = {str(slot.ip): f"{self.name}-{i}" for i, slot in enumerate(self.slots[:count])}

            def listening() -> bool:
                for ip in list(pending):
                    try:
                        socket.create_connection((ip, 22), timeout=0.05).close()
                        del pending[ip]
                    except OSError:
                        pass
                return not pending

            if not poll(listening, self.settings.boot_timeout, 0.05):
                consoles = "\n".join(f"--- {name} at {ip}, its console (tail):\n{self.console_tail(name)}"
                                     for ip, name in pending.items())
                raise SystemExit(f"Baseline VMs did not accept connections on port 22 within "
                                 f"{self.settings.boot_timeout:.0f} s (--ost-boot-timeout):\n{consoles}")
            return time.monotonic() - start
        finally:
            for name in names:
                self.ledger.remove(self.conn, "domain", name)

    def console(self, name: str) -> Path:
        return self.run.workdir.path / f"{name}.log"

    def console_tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.console(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(unreadable: {exc.strerror})"

    def close(self) -> None:
        """Remove the domains, the network and the folder (their labels checked first)."""
        try:
            self.ledger.remove_all(self.conn)
        finally:
            self.conn.close()


# --- figures -----------------------------------------------------------------------------


def measure_boot(repeat: int, baseline: Baseline, results: dict) -> None:
    plugin_runs = []
    base_runs = []
    for i in range(repeat):
        # alternate, so that warm caches favour neither side
        base_runs.append(baseline.boot(1))
        plugin_runs.append(plugin_boot([VMSpec("vm", LAYER)]))
        print(f"  boot run {i + 1}: baseline {base_runs[-1]:.2f} s, plugin {plugin_runs[-1]['ready']:.2f} s",
              flush=True)
    results["boot"] = {"plugin": stats([r["ready"] for r in plugin_runs]), "baseline": stats(base_runs)}
    results["readiness"] = {"plugin": stats([r["latency"] for r in plugin_runs])}
    results["ssh login, idle guest"] = {"plugin": stats([r["login"] for r in plugin_runs])}
    results["teardown_1vm"] = {"plugin": stats([r["teardown"] for r in plugin_runs])}


def measure_parallel(repeat: int, baseline: Baseline, results: dict) -> None:
    for n in range(1, 5):
        runs = [plugin_boot([VMSpec(f"vm{i}", LAYER) for i in range(n)])["ready"] for _ in range(repeat)]
        base = [baseline.boot(n) for _ in range(repeat)]
        results[f"parallel_{n}"] = {"plugin": stats(runs), "baseline": stats(base)}
        print(f"  {n} VMs together: plugin {min(runs):.1f} s, baseline {min(base):.1f} s", flush=True)
    env = [VMSpec("engine", "engine-installed"), VMSpec("host0", "host-installed"),
           VMSpec("host1", "host-installed")]
    together = [plugin_boot(env) for _ in range(repeat)]
    sequential = [sum(plugin_boot([spec])["ready"] for spec in env) for _ in range(repeat)]
    results["engine_2_hosts"] = {"plugin": stats([r["ready"] for r in together]),
                                 "baseline": stats(sequential)}
    results["teardown_3vm"] = {"plugin": stats([r["teardown"] for r in together])}
    print(f"  engine + 2 hosts: together {min(r['ready'] for r in together):.1f} s, "
          f"one after another {min(sequential):.1f} s", flush=True)


def measure_overlay(repeat: int, image: Image, results: dict) -> None:
    from pytest_ostimages.lab.workdir import WorkDir

    with tempfile.TemporaryDirectory(prefix="ost-bench-", dir="/var/tmp") as tmp:
        scratch = Path(tmp)
        big = scratch / "big.qcow2"
        tool(["qemu-img", "create", "-q", "-f", "qcow2", str(big), "100G"])
        tool(["qemu-io", "-c", "write -P 0xab 0 1G", str(big)])
        images = {"installed layer": image,
                  "100 GiB image with 1 GiB data": Image("bench", "big", big, (big,), ("qcow2",))}
        for n, (label, img) in enumerate(images.items()):
            times, sizes = [], []
            for i in range(repeat * 3):
                work = WorkDir(scratch, f"image{n}-run{i}")
                work.path.mkdir()
                t0 = time.monotonic()
                overlay = work.overlay(img, "vm")
                times.append(time.monotonic() - t0)
                sizes.append(overlay.stat().st_blocks * 512)
            results[f"overlay: {label}"] = {"plugin": stats(times), "bytes": max(sizes),
                                            "image_bytes": img.path.stat().st_size}


def measure_revert(repeat: int, results: dict) -> None:
    """clean_vm's snapshot revert against booting a fresh VM."""
    lab = Lab(config())
    try:
        t0 = time.monotonic()
        [vm] = lab.boot([VMSpec("clean", LAYER)])
        boot = time.monotonic() - t0
        snapshot = vm.snapshot()
        reverts = []
        for _ in range(repeat):
            vm.ssh("echo dirty > /root/marker", check=True)
            t0 = time.monotonic()
            vm.revert()
            vm.ssh("true", check=True)  # ready for the next test: SSH answers again
            reverts.append(time.monotonic() - t0)
    finally:
        lab.close()
    results["clean_vm revert"] = {"plugin": stats(reverts), "baseline": stats([boot]),
                                  "snapshot": snapshot}
    print(f"  revert to clean state: {min(reverts):.2f} s (snapshot {snapshot:.2f} s, boot {boot:.1f} s)",
          flush=True)


def reuse_sessions(command: list[str], repeat: int) -> list[float]:
    """Seconds of `command` (a session with --ost-reuse) run `repeat` + 1 times: the first boots,
    the others attach; the kept VMs are removed at the end."""
    runs = []
    try:
        for _ in range(repeat + 1):
            t0 = time.monotonic()
            session(command, "a session with --ost-reuse")
            runs.append(time.monotonic() - t0)
    finally:
        session([sys.executable, "-m", "pytest", "--ost-cleanup"], "pytest --ost-cleanup")
    return runs


def measure_reuse(repeat: int, results: dict) -> None:
    """A one-test session with --ost-reuse: the first boots, the next ones attach."""
    with tempfile.TemporaryDirectory() as tmp:
        test = Path(tmp) / "test_one.py"
        test.write_text("def test_one(ost_vm):\n    assert ost_vm.ssh('true').returncode == 0\n")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test),
                   f"--ost-image={LAYER}", f"--ost-memory={MEMORY}", f"--ost-vcpus={VCPUS}", "--ost-warm=off"]
        runs = reuse_sessions([*command, "--ost-reuse"], repeat)
    results["session with --ost-reuse"] = {"plugin": stats(runs[1:]), "baseline": stats(runs[:1])}
    print(f"  --ost-reuse: first session {runs[0]:.1f} s, next ones {min(runs[1:]):.1f} s", flush=True)


def measure_suite(results: dict) -> None:
    for workers in ("0", "2"):
        t0 = time.monotonic()
        done = session([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", workers,
                        str(ROOT / "examples" / "basic_suite")], f"the example suite with -n {workers}", check=False)
        elapsed = time.monotonic() - t0
        results[f"suite -n {workers}"] = {"plugin": stats([elapsed]), "passed": done.returncode == 0}
        print(f"  example suite -n {workers}: {elapsed:.1f} s ({'passed' if done.returncode == 0 else 'FAILED'})",
              flush=True)


def measure_identity(repeat: int, results: dict) -> None:
    """Boot to ready with an identity of its own (auto) vs the image's (keep), same VM."""
    runs: dict[str, list[float]] = {"auto": [], "keep": []}
    for _ in range(repeat):
        for mode in runs:
            runs[mode].append(plugin_boot([VMSpec("vm", LAYER)], ost_identity=mode)["ready"])
    results["identity: boot to ready, auto vs keep"] = {"plugin": stats(runs["auto"]),
                                                        "baseline": stats(runs["keep"])}
    print(f"  identity: auto {min(runs['auto']):.1f} s, keep {min(runs['keep']):.1f} s", flush=True)
    # the other mechanism: a layer with cloud-init, its NoCloud seed vs none (identity kept)
    cloud: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(repeat):
        cloud["on"].append(plugin_boot([VMSpec("vm", "cloud-installed")], ost_cloud_init="on")["ready"])
        cloud["off"].append(plugin_boot([VMSpec("vm", "cloud-installed")], ost_cloud_init="off",
                                        ost_identity="keep")["ready"])
    results["identity: cloud-init seed vs none"] = {"plugin": stats(cloud["on"]), "baseline": stats(cloud["off"])}
    print(f"  identity through cloud-init: {min(cloud['on']):.1f} s, none {min(cloud['off']):.1f} s", flush=True)


def measure_ip_versions(repeat: int, results: dict) -> None:
    """Boot to ready on an IPv6-only and an IPv4-only network vs dual stack, same VM."""
    runs: dict[str, list[float]] = {"both": [], "6": [], "4": []}
    for _ in range(repeat):
        for version in runs:
            runs[version].append(plugin_boot([VMSpec("vm", LAYER)], ost_ip_version=version)["ready"])
    for version in ("6", "4"):
        results[f"IPv{version} only vs dual stack: boot to ready"] = {"plugin": stats(runs[version]),
                                                                       "baseline": stats(runs["both"])}
    print("  ip versions: " + ", ".join(f"{v} {min(r):.1f} s" for v, r in runs.items()), flush=True)


def measure_warm(repeat: int, results: dict) -> None:
    """engine + 2 hosts restored from saved states vs booted; the example suite cold, twice."""
    specs = [VMSpec("engine", "engine-installed"), VMSpec("host0", "host-installed"),
             VMSpec("host1", "host-installed")]
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o755)
        settings = {"ost_warm": "on", "ost_workdir": tmp}
        booted = plugin_boot(specs, **settings)["ready"]  # saves the states at its end
        restored = [plugin_boot(specs, **settings)["ready"] for _ in range(repeat)]
    results["warm: engine + 2 hosts ready"] = {"plugin": stats(restored), "baseline": stats([booted])}
    print(f"  warm start, engine + 2 hosts: restored {min(restored):.1f} s, booted {booted:.1f} s", flush=True)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o755)
        runs = []
        for _ in range(2):
            t0 = time.monotonic()
            session([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--ost-warm=on",
                     f"--ost-workdir={tmp}", str(ROOT / "examples" / "basic_suite")], "the example suite, warm")
            runs.append(time.monotonic() - t0)
    results["warm: example suite, cold session"] = {"plugin": stats(runs[1:]), "baseline": stats(runs[:1])}
    print(f"  example suite: first run {runs[0]:.1f} s (boots, saves), next cold run {runs[1]:.1f} s", flush=True)


def measure_ost(repeat: int, results: dict) -> None:
    """The example OST topology: boot + deploy scripts vs the same boot without them."""
    example = ROOT / "examples" / "ost_suite"
    topology = initconfig.load(example / "basic-suite" / "ost.json", example, config().images_dir, {})
    runs: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeat):
        for with_scripts in runs:
            specs = [dataclasses.replace(vm, memory=None, vcpus=None,
                                         deploy_scripts=vm.deploy_scripts if with_scripts else ())
                     for vm in topology.vms]
            lab = Lab(config())
            lab.ost = OstDeployment(topology.suite, example, topology.networks)
            start = time.monotonic()
            try:
                lab.boot(specs)
                ost.deploy(lab, specs, example)
                runs[with_scripts].append(time.monotonic() - start)
            finally:
                lab.close()
    results["ost: example topology boot + deploy"] = {"plugin": stats(runs[True]), "baseline": stats(runs[False])}
    print(f"  OST example topology: booted and deployed {min(runs[True]):.1f} s, booted only "
          f"{min(runs[False]):.1f} s", flush=True)


def measure_ost_reuse(repeat: int, results: dict) -> None:
    """A session of the example OST suite (one test) with --ost-reuse: the first boots and
    deploys, the next ones attach to the kept deployment."""
    example = ROOT / "examples" / "ost_suite"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--ost-reuse",
               f"--ost-init-config={example / 'basic-suite' / 'ost.json'}", f"--ost-root={example}",
               f"--ost-memory={MEMORY}", f"--ost-vcpus={VCPUS}", "-k", "test_backend_finds_every_vm",
               str(example / "basic-suite")]
    runs = reuse_sessions(command, repeat)
    results["ost: example suite session with --ost-reuse"] = {"plugin": stats(runs[1:]), "baseline": stats(runs[:1])}
    print(f"  OST --ost-reuse: first session {runs[0]:.1f} s, next ones {min(runs[1:]):.1f} s", flush=True)


def measure_inside(repeat: int, results: dict) -> None:
    """--ost-run-inside on examples/inside: command start -> first inner test result, per share mode."""
    times: dict[str, list[float]] = {"virtiofs": [], "copy": []}
    for _ in range(repeat):
        for mode in times:
            command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                       "--ost-run-inside=host-installed", f"--ost-inside-share={mode}",
                       f"--ost-memory={MEMORY}", f"--ost-vcpus={VCPUS}", "--ost-warm=off",
                       str(ROOT / "examples" / "inside")]
            t0 = time.monotonic()
            passed: list[float] = []

            def on_line(line: str) -> None:
                if " PASSED" in line:
                    passed.append(time.monotonic() - t0)

            session(command, f"--ost-run-inside ({mode})", on_line=on_line)
            if not passed:
                raise SystemExit(f"--ost-run-inside ({mode}) passed no inner test: {' '.join(command)}")
            times[mode].append(passed[0])
    results["inside: first inner result"] = {"plugin": stats(times["virtiofs"]), "baseline": stats(times["copy"])}
    print(f"  inside, first result: shared {min(times['virtiofs']):.1f} s, copied {min(times['copy']):.1f} s",
          flush=True)


def efi_settings(**settings: str) -> dict[str, str]:
    """The debian12efi images (NetworkManager, cloud-init, firewalld, UEFI), 640 MiB: as real ost-images."""
    return {"ost_distro": "debian12efi", "ost_memory": "640", **settings}


def measure_uefi(repeat: int, results: dict) -> None:
    """Boot to ready of the same guest content under UEFI vs BIOS (debian12efi's base and its BIOS
    twin, images/build-test-images --bios-twin), and a UEFI guest restored (warm start) vs booted."""
    twins = sorted(Path("/var/cache/pytest-ostimages/test-images/debian12efi").glob("*/debian12efi-base-bios.qcow2"))
    if not twins:
        raise SystemExit("no BIOS twin of debian12efi-base: images/build-test-images --set debian12efi --bios-twin")
    runs: dict[str, list[float]] = {"efi": [], "bios": []}
    for _ in range(repeat):
        runs["efi"].append(plugin_boot([VMSpec("vm", "base")], **efi_settings())["ready"])
        runs["bios"].append(plugin_boot([VMSpec("vm", str(twins[-1]))], **efi_settings())["ready"])
    results["uefi: boot to ready, same guest, UEFI vs BIOS"] = {"plugin": stats(runs["efi"]),
                                                                 "baseline": stats(runs["bios"])}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o755)
        warm = efi_settings(ost_warm="on", ost_workdir=tmp)
        booted = plugin_boot([VMSpec("vm", "base")], **warm)["ready"]  # saves its state at its end
        restored = [plugin_boot([VMSpec("vm", "base")], **warm)["ready"] for _ in range(repeat)]
    results["uefi: a guest restored vs booted"] = {"plugin": stats(restored), "baseline": stats([booted])}
    print(f"  UEFI {min(runs['efi']):.1f} s, BIOS {min(runs['bios']):.1f} s; restored {min(restored):.1f} s "
          f"vs booted {booted:.1f} s", flush=True)


# a pool the first free subnets of the default one are not in: restores there move every NIC
OTHER_POOL = "192.168.224.0/21"


def measure_warm_nm(repeat: int, results: dict) -> None:
    """engine + 2 hosts on NetworkManager guests (debian12efi) restored vs booted: on the subnets they
    were saved on (the NICs kept) and on others (every NIC moved), alternating."""
    specs = [VMSpec("engine", "engine-installed"), VMSpec("host0", "host-installed"),
             VMSpec("host1", "host-installed")]
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o755)
        warm = efi_settings(ost_warm="on", ost_workdir=tmp)
        booted = plugin_boot(specs, **warm)["ready"]
        kept, moved = [], []
        for _ in range(repeat):
            kept.append(plugin_boot(specs, **warm)["ready"])
            moved.append(plugin_boot(specs, **warm, ost_subnet_pool=OTHER_POOL)["ready"])
    results["warm: engine + 2 hosts, NetworkManager guests"] = {"plugin": stats(kept), "baseline": stats([booted])}
    results["warm: the same, restored on other subnets"] = {"plugin": stats(moved), "baseline": stats([booted])}
    print(f"  NM guests, engine + 2 hosts: restored {min(kept):.1f} s (on other subnets {min(moved):.1f} s), "
          f"booted {booted:.1f} s", flush=True)


def ost_session(warm_root: str, *args: str) -> tuple[float, str]:
    """One session of the example OST suite: seconds, and its output."""
    example = ROOT / "examples" / "ost_suite"
    command = [sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", "--ost-warm=on",
               f"--ost-workdir={warm_root}", f"--ost-init-config={example / 'basic-suite' / 'ost.json'}",
               f"--ost-root={example}", f"--ost-memory={MEMORY}", f"--ost-vcpus={VCPUS}", str(example / "basic-suite"),
               *args]
    t0 = time.monotonic()
    done = session(command, "the example OST suite")
    return time.monotonic() - t0, done.stdout


def ready_seconds(output: str, what: str) -> float:
    """Seconds from the first progress line to the one matching `what` (both carry no clock: use the
    plugin's own figures where they say them)."""
    return figure(output, rf"{what} in ([0-9.]+) s")


def figure(output: str, pattern: str) -> float:
    """The number `pattern`'s group catches first in `output` (NaN: none)."""
    import re

    found = re.search(pattern, output)
    return float(found.group(1)) if found else float("nan")


def measure_warm_ost(repeat: int, results: dict) -> None:
    """The example OST topology ready and deployed: restored vs booted + deployed; its checkpoint
    fixture restored vs run (against restoring the VMs alone); 1, 2 and 4 sessions restoring at once."""
    test = "-k", "test_backend_finds_every_vm or enrolled_host"  # one plain test, one that needs the checkpoint
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o755)
        first_total, first = ost_session(tmp, *test)  # boots, deploys, runs the checkpoint: saves both
        booted = ready_seconds(first, "VMs ready") + ready_seconds(first, "deploy scripts of 4 VMs done")
        checkpoint_run = ready_seconds(first, "checkpoint hosts_enrolled: ran")
        restores, checkpoints, totals, moved = [], [], [], []
        for _ in range(repeat):
            total, output = ost_session(tmp, *test)
            totals.append(total)
            restores.append(ready_seconds(output, "4 VMs ready"))
            checkpoints.append(ready_seconds(output, "environment of 4 VMs restored from \\w+"))
            moved.append(ready_seconds(ost_session(tmp, *test, f"--ost-subnet-pool={OTHER_POOL}")[1], "4 VMs ready"))
        results["warm ost: topology ready and deployed, restored vs booted + deployed"] = {
            "plugin": stats(restores), "baseline": stats([booted])}
        results["warm ost: the same, restored on other subnets"] = {"plugin": stats(moved), "baseline": stats([booted])}
        results["warm ost: checkpoint fixture restored vs run"] = {"plugin": stats(checkpoints),
                                                                   "baseline": stats([checkpoint_run])}
        results["warm ost: checkpoint restore vs restoring the VMs alone"] = {"plugin": stats(checkpoints),
                                                                              "baseline": stats(restores)}
        results["warm ost: session, restored vs first"] = {"plugin": stats(totals), "baseline": stats([first_total])}
        print(f"  OST warm: booted + deployed {booted:.1f} s, restored {min(restores):.1f} s (on other subnets "
              f"{min(moved):.1f} s); checkpoint run "
              f"{checkpoint_run:.1f} s, restored {min(checkpoints):.1f} s", flush=True)
        concurrent: dict[int, list[float]] = {}
        for count in (1, 2, 4):
            example = ROOT / "examples" / "ost_suite"
            commands = [[sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--ost-warm=on",
                         f"--ost-workdir={tmp}", f"--ost-init-config={example / 'basic-suite' / 'ost.json'}",
                         f"--ost-root={example}", f"--ost-memory={MEMORY}", f"--ost-vcpus={VCPUS}", "-s",
                         str(example / "basic-suite"), "-k", "test_backend_finds_every_vm"] for _ in range(count)]
            t0 = time.monotonic()
            done = each(lambda c: session(c, f"one of {count} sessions restoring at once"), commands)
            concurrent[count] = [ready_seconds(d.stdout, "4 VMs ready") for d in done] + [time.monotonic() - t0]
        for count in (2, 4):
            results[f"warm ost: {count} sessions restoring at once vs 1 (VMs ready)"] = {
                "plugin": stats(concurrent[count][:-1]), "baseline": stats(concurrent[1][:-1])}
        print("  OST warm, sessions at once: " + ", ".join(
            f"{n}: {max(v[:-1]):.1f} s ready, {v[-1]:.1f} s in all" for n, v in concurrent.items()), flush=True)


RTT_TEST = """
import time

def test_rtt(ost_vm):
    ost_vm.ssh("true", check=True)
    start, count = time.monotonic(), 20
    for _ in range(count):
        ost_vm.ssh("true", check=True)
    print(f"SSH-RTT {(time.monotonic() - start) / count:.4f}")
"""


def measure_remote(repeat: int, results: dict) -> None:
    """One VM through a qemu+ssh:// hypervisor (this machine, in tests/e2e/remote.py's rig: a client
    namespace that reaches only the hypervisor's sshd, and holds none of its files) vs the local URI:
    boot to ready, an SSH command's round trip, a warm restore; sessions alternate local and remote."""
    from tests.e2e.remote import remote_hypervisor

    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp, remote_hypervisor() as hv:
        os.chmod(tmp, 0o755)
        (Path(tmp) / "test_rtt.py").write_text(RTT_TEST)
        common = [sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", f"--ost-distro={SETTINGS['ost_distro']}",
                  f"--ost-memory={MEMORY}", f"--ost-vcpus={VCPUS}", f"--ost-image={LAYER}", "test_rtt.py"]
        found: dict[str, dict[str, list[float]]] = {where: {"boot": [], "rtt": [], "restore": []}
                                                     for where in ("local", "remote")}

        def one(where: str, *args: str) -> str:
            if where == "local":
                done = subprocess.run([*common, *args], cwd=tmp, capture_output=True, text=True,
                                      stdin=subprocess.DEVNULL, timeout=SESSION_TIMEOUT)
            else:
                done = hv.run([*common, f"--ost-libvirt-uri={hv.uri}", *args], cwd=tmp, timeout=SESSION_TIMEOUT,
                              stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                raise SystemExit(f"the {where} session failed:\n{(done.stdout + done.stderr)[-3000:]}")
            return done.stdout

        for _ in range(repeat):
            for where in ("local", "remote"):
                output = one(where, "--ost-warm=off")
                found[where]["boot"].append(ready_seconds(output, "vm: ssh ready"))
                found[where]["rtt"].append(figure(output, r"SSH-RTT ([\d.]+)"))
        for where in ("local", "remote"):
            warm = f"--ost-warm-dir={tmp}/warm-{where}"
            one(where, "--ost-warm=on", warm)  # boots and saves
            for _ in range(repeat):
                output = one(where, "--ost-warm=on", warm)
                found[where]["restore"].append(figure(output, r"vm: restored .* in ([\d.]+) s \("))
    local, remote = found["local"], found["remote"]
    results["remote: boot to ready, qemu+ssh:// vs local"] = {"plugin": stats(remote["boot"]),
                                                              "baseline": stats(local["boot"])}
    results["remote: SSH command round trip, via the hypervisor vs direct"] = {
        "plugin": stats(remote["rtt"]), "baseline": stats(local["rtt"])}
    results["remote: warm restore, qemu+ssh:// vs local"] = {"plugin": stats(remote["restore"]),
                                                             "baseline": stats(local["restore"])}
    print(f"  remote: boot {min(remote['boot']):.1f} s vs {min(local['boot']):.1f} s local; SSH round trip "
          f"{min(remote['rtt']) * 1000:.1f} ms vs {min(local['rtt']) * 1000:.1f} ms; restore "
          f"{min(remote['restore']):.1f} s vs {min(local['restore']):.1f} s", flush=True)


ANSIBLE_TEST = """
import tempfile, time

import ansible_runner


def call(inventory):
    with tempfile.TemporaryDirectory() as private:
        start = time.monotonic()
        run = ansible_runner.run(private_data_dir=private, inventory=inventory, host_pattern="all", module="shell",
                                 module_args="cat /etc/hostname", quiet=True)
        assert run.status == "successful", run.status
        return time.monotonic() - start


def test_calls(ost_vm, ost_ansible_inventory, tmp_path):
    written = ost_ansible_inventory.read_text()
    assert " ansible_pipelining=true" in written
    without = tmp_path / "without"  # the same inventory, ansible's default transfer of each module
    without.write_text(written.replace(" ansible_pipelining=true", ""))
    call(str(ost_ansible_inventory))  # the first login and python's first start are in neither figure
    for _ in range(REPEAT):
        print(f"ANSIBLE-CALL {call(str(ost_ansible_inventory)):.3f} {call(str(without)):.3f}")
"""


def measure_ansible(repeat: int, results: dict) -> None:
    """One ansible module run through the session's inventory (pipelined) vs the same inventory
    without pipelining, on one booted VM, alternating (ansible-runner, as OST's ost_utils runs it)."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        (Path(tmp) / "test_ansible.py").write_text(ANSIBLE_TEST.replace("REPEAT", str(max(repeat, 3))))
        output = session([sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", "-c", "/dev/null",
                          f"--rootdir={tmp}", f"--ost-distro={SETTINGS['ost_distro']}", f"--ost-memory={MEMORY}",
                          f"--ost-vcpus={VCPUS}", f"--ost-image={LAYER}", str(Path(tmp) / "test_ansible.py")],
                         "the ansible session").stdout
    calls = [line.split()[1:] for line in output.splitlines() if line.startswith("ANSIBLE-CALL ")]
    results["ansible: a module through the session's inventory, pipelined vs not"] = {
        "plugin": stats([float(p) for p, _ in calls]), "baseline": stats([float(b) for _, b in calls])}
    print("  ansible call: " + ", ".join(f"{p} vs {b} s" for p, b in calls), flush=True)


# figures measured after the in-process baseline is closed, in this order: (repeat, results) each
LATER: dict[str, tuple[Callable[[int, dict], None], ...]] = {
    "inside": (measure_inside,), "identity": (measure_identity,), "warm": (measure_warm,),
    "ost": (measure_ost, measure_ost_reuse), "ip": (measure_ip_versions,), "uefi": (measure_uefi,),
    "warm-nm": (measure_warm_nm,), "warm-ost": (measure_warm_ost,), "remote": (measure_remote,),
    "ansible": (measure_ansible,)}


# --- report -------------------------------------------------------------------------------

FIGURES = ("overlay", "boot", "parallel", "revert", "reuse", "suite", "inside", "identity", "warm", "ost",
           "ip", "uefi", "warm-nm", "warm-ost", "remote", "ansible")

GOALS: dict[str, tuple[str, Callable[[dict], bool]]] = {
    "boot": ("ratio <= 1.05 and overhead <= 0.5 s",
             lambda r: r["plugin"]["median"] / r["baseline"]["median"] <= 1.05
             and r["plugin"]["median"] - r["baseline"]["median"] <= 0.5),
    "readiness": ("<= 0.25 s", lambda r: r["plugin"]["median"] <= 0.25),
    "engine_2_hosts": ("together < one after another", lambda r: r["plugin"]["median"] < r["baseline"]["median"]),
    "remote: boot to ready, qemu+ssh:// vs local": (
        "ratio <= 1.10", lambda r: r["plugin"]["median"] / r["baseline"]["median"] <= 1.10),
}


def report(results: dict) -> None:
    print(f"\n{'figure':34} {'plugin min/median':>20} {'baseline min/median':>22} {'ratio':>7}  goal")
    for name, r in results.items():
        if not isinstance(r, dict) or "plugin" not in r:
            continue
        p = r["plugin"]
        line = f"{name:34} {p['min']:9.3f} /{p['median']:8.3f} s"
        if "baseline" in r:
            b = r["baseline"]
            line += f" {b['min']:10.3f} /{b['median']:8.3f} s {p['median'] / b['median']:7.3f}"
        elif "bytes" in r:
            line += f" {r['bytes'] / 1024:14.0f} KiB overlay (image {r['image_bytes'] / 2**20:.0f} MiB)"
        if name in GOALS:
            text, met = GOALS[name]
            line += f"  {text}: {'met' if met(r) else 'NOT met'}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=FIGURES, help="measure only these figures")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = parser.parse_args()

    settings = config()
    lab = Lab(settings)
    try:
        image = lab.inputs.image(LAYER)
        virt_type, cpu_mode, templates = lab.virt_type, lab.cpu_mode, lab.inputs.templates
    finally:
        lab.close()
    results: dict[str, Any] = {"machine": {"host": platform.node(), "cpus": os.cpu_count(),
                                           "virt_type": virt_type, "memory_mib": MEMORY, "vcpus": VCPUS,
                                           "image": str(image.path), "date": time.strftime("%Y-%m-%d")}}
    print(f"benchmarks on {platform.node()} ({os.cpu_count()} CPUs, {virt_type} guests, "
          f"{VCPUS} vCPU / {MEMORY} MiB each, {args.repeat} runs per figure)", flush=True)
    wanted = set(args.only or FIGURES)
    baseline = Baseline(settings, image, virt_type, cpu_mode, templates)
    try:
        if "overlay" in wanted:
            measure_overlay(args.repeat, image, results)
        if "boot" in wanted:
            measure_boot(args.repeat, baseline, results)
        if "parallel" in wanted:
            measure_parallel(args.repeat, baseline, results)
        if "revert" in wanted:
            measure_revert(args.repeat, results)
        if "reuse" in wanted:
            measure_reuse(args.repeat, results)
    finally:
        baseline.close()
    if "suite" in wanted:
        measure_suite(results)
    for name, measures in LATER.items():
        if name in wanted:
            for measure in measures:
                measure(args.repeat, results)
    report(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nraw figures: {args.json}")


if __name__ == "__main__":
    main()
