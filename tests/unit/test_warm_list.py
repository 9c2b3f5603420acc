"""``--ost-warm-list`` lists every saved state, a damaged one as damaged (never a traceback)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pytest_ostimages.state.warmcache import WarmCache

GOOD = {"key": "a" * 16, "saved": time.time() - 7200, "kind": "vm", "role": "engine", "image": "testos-engine-installed",
        "inputs": {"memory": 512}}
DAMAGED: dict[str, "str | bytes"] = {
    "b" * 16: "{not json",  # a save cut short by a full disk
    "c" * 16: json.dumps(["a", "list"]),
    "d" * 16: json.dumps({**GOOD, "saved": "yesterday"}),
    "e" * 16: json.dumps({**GOOD, "inputs": ["memory"]}),
    "f" * 16: json.dumps({**GOOD, "kind": "environment", "name": "box", "roles": 3}),
    "0" * 16: b"\x80 not text",
}


@pytest.fixture
def warm(tmp_path: Path) -> Path:
    root = tmp_path / "warm"
    # saved two hours before the test runs, not before it was collected (an xdist worker may run it 30 minutes later)
    states: dict[str, "str | bytes"] = {"a" * 16: json.dumps({**GOOD, "saved": time.time() - 7200}), **DAMAGED}
    for age, (key, meta) in enumerate(states.items(), 1):
        (root / key).mkdir(parents=True)
        (root / key / "memory.save").write_bytes(b"\0" * 2**20)
        written = root / key / "meta.json"
        written.write_bytes(meta if isinstance(meta, bytes) else meta.encode())
        os.utime(written, (age, age))  # listed in this order: least recently used first
    return root


def test_a_damaged_state_is_listed_as_damaged(pytester: pytest.Pytester, warm: Path) -> None:
    result = pytester.runpytest_inprocess(f"--ost-warm-dir={warm}", "--ost-warm-list")
    assert result.ret == 0
    output = result.stdout.str()
    assert "Traceback" not in output and "JSONDecodeError" not in output
    result.stdout.fnmatch_lines([
        f"{'a' * 16}  *1 MiB  *2.0 h old  VM engine of testos-engine-installed  ?memory: 512?",
        f"{'b' * 16}  *1 MiB  damaged: meta.json is not JSON*",
        f"{'c' * 16}  *1 MiB  damaged: meta.json holds a list, not an object*",
        f"{'d' * 16}  *1 MiB  damaged: meta.json's 'saved' is 'yesterday', not a number*",
        f"{'e' * 16}  *1 MiB  damaged: meta.json's 'inputs' is ?'memory'?, not an object*",
        f"{'f' * 16}  *1 MiB  damaged: meta.json's 'roles' is 3, not a list*",
        f"{'0' * 16}  *1 MiB  damaged: meta.json is not JSON*",
        "*6 damaged states*pytest --ost-cleanup --ost-warm-cache*removes every saved state not in use*",
    ])


def test_cleanup_removes_damaged_states(warm: Path) -> None:
    assert sorted(WarmCache(warm, 0).clear()) == sorted(["a" * 16, *DAMAGED])
    assert list(warm.iterdir()) == []
