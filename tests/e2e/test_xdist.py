"""pytest -n N: every worker its own environment, or one shared by all (--ost-share)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import INNER, RESTORABLE

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


RECORDER = """
    import os
    from pathlib import Path

    from pytest_ostimages import VM

    def pytest_runtest_teardown(item):
        # the VMs this test got, by libvirt name (<run>-...: each run names its own)
        vms = [v for value in getattr(item, "funcargs", {}).values()
               for v in (value if isinstance(value, list) else [value]) if isinstance(v, VM)]
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        Path(os.environ["OST_E2E_SEEN"], f"{worker}-{item.name}").write_text(" ".join(v.name for v in vms))
"""


def test_each_worker_boots_its_own_environment(pytester: pytest.Pytester, unchanged: None, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # each worker boots the VMs of its tests (6 in all here) on 2 cores: the host-wide boot
    # slots keep them all in time
    pytester.makepyfile(ost_e2e_recorder=RECORDER)
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    monkeypatch.setenv("OST_E2E_SEEN", str(tmp_path))
    result = pytester.runpytest_subprocess(str(EXAMPLES / "basic_suite"), "-n", "2", "-p", "no:cacheprovider",
                                           "-p", "ost_e2e_recorder", *RESTORABLE)
    result.assert_outcomes(passed=7)
    runs: dict[str, set[str]] = {}  # worker -> the run ids of the VMs its tests got
    for record in tmp_path.iterdir():
        runs.setdefault(record.name.split("-")[0], set()).update(
            name.split("-")[1] for name in record.read_text().split())
    assert sorted(runs) == ["gw0", "gw1"], runs
    assert all(len(ids) == 1 for ids in runs.values()), runs  # one environment per worker
    assert runs["gw0"] != runs["gw1"], f"the workers shared one environment: {runs}"


def test_shared_environment_is_booted_once(pytester: pytest.Pytester, unchanged: None,
                                           tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    seen.mkdir()
    pytester.makepyfile(**{f"test_{i}": f"""
        import os, time
        def test_{i}(engine, host0):
            time.sleep(1)  # let every worker get some tests
            (__import__("pathlib").Path({str(seen)!r}) / "{i}").write_text(
                os.environ["PYTEST_XDIST_WORKER"] + " " + engine.name + " " + host0.name)
            assert engine.ssh("true").returncode == 0
    """ for i in range(6)})
    result = pytester.runpytest_subprocess("-n", "3", "--ost-share", "--ost-hosts=1", *INNER, *RESTORABLE)
    result.assert_outcomes(passed=6)
    records = [p.read_text().split() for p in seen.iterdir()]
    workers = {r[0] for r in records}
    assert len(workers) >= 2, records
    assert len({(r[1], r[2]) for r in records}) == 1, f"workers used different VMs: {records}"
