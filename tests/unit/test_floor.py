"""The plugin works on the oldest pytest that setup.py accepts, not only on today's.

.ci/setup installs the package with that pytest in .venv-floor; the unit tests that run
pytest sessions with the plugin (those that use pytester: its options, hooks, fixtures,
plan and errors) run there again, in a subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOOR = ROOT / ".venv-floor"
# pytest 8.0 to 8.3 take /dev for the rootdir of `-c /dev/null`, today's pytest the invocation
# directory, which this test's inner session relies on; the plugin is not involved.
NEEDS_A_NEWER_PYTEST = ["tests/unit/test_inside.py::test_a_bad_inner_argument_is_a_usage_error_not_a_traceback"]


def declared_floor() -> str:
    found = re.search(r'"pytest>=([0-9.]+)"', (ROOT / "setup.py").read_text())
    assert found, 'setup.py declares no "pytest>=VERSION" requirement'
    return found.group(1)


def test_the_plugin_s_sessions_pass_on_the_declared_pytest_floor() -> None:
    floor = declared_floor()
    python = FLOOR / "bin" / "python"
    if not python.exists():
        message = f"{FLOOR} (pytest {floor}, the floor setup.py declares) is missing: run .ci/setup"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    version = subprocess.run([str(python), "-c", "import pytest; print(pytest.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert re.fullmatch(re.escape(floor) + r"(\.\d+)*", version), \
        f"{FLOOR} has pytest {version}, but setup.py declares pytest>={floor}: run .ci/setup"
    sessions = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests" / "unit").glob("test_*.py")
                      if "pytester" in path.read_text() and path.name != Path(__file__).name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # an xdist worker's, say
    result = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *sessions,
                             *(f"--deselect={test}" for test in NEEDS_A_NEWER_PYTEST)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"on pytest {version}:\n" + "\n".join(output.splitlines()[-60:])
