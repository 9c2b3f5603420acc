"""What cloud-init's own record says, and which of its errors fail a boot (guest/cloudinit.py)."""

from __future__ import annotations

import json

import pytest

from pytest_ostimages.guest.cloudinit import PLUGIN_MODULES, Report, asked_modules

LOCALE = ("('locale', ProcessExecutionError(\"Unexpected error while running command.\\nCommand: "
          "['update-locale', 'LANG=C.UTF-8']\\nExit code: -\\nReason: [Errno 2] No such file or directory\"))")


def status(**stages: dict) -> str:
    """A /run/cloud-init/status.json as cloud-init writes it (every stage, then datasource and stage)."""
    empty = {"errors": [], "finished": 1.0, "start": 0.5}
    v1 = {name: {**empty, **stages.get(name.replace("-", "_"), {})}
          for name in ("init-local", "init", "modules-config", "modules-final")}
    return json.dumps({"v1": {**v1, "datasource": "DataSourceNoCloud [seed=/dev/vdz]", "stage": None}})


def test_a_module_nobody_asked_for_is_a_warning() -> None:
    # Debian 12's cloud-init 22.4 on an image without locales: status error, exit 1; the VM is fine
    report = Report.parse(status(modules_config={"errors": [LOCALE]}))
    asked = asked_modules({"write_files": [{"path": "/x", "content": "y"}]})
    assert report.failures(asked) == []
    [warning] = report.warnings(asked)
    assert warning.startswith("module locale: ProcessExecutionError(") and "update-locale" in warning


# as Debian 12's cloud-init 22.4 names it (cloud.cfg's spelling), and as later versions do
@pytest.mark.parametrize("name", ["scripts-user", "scripts_user", "cc_scripts_user"])
def test_a_module_the_suite_asked_for_fails_the_boot(name: str) -> None:
    failed = f"('{name}', RuntimeError('Runparts: 1 failures (runcmd) in 1 attempted commands'))"
    report = Report.parse(status(modules_final={"errors": [failed]}, modules_config={"errors": [LOCALE]}))
    asked = asked_modules("#cloud-config\nruncmd:\n  - [false]\n")  # text: runcmd's script runs in scripts_user
    assert report.failures(asked) == ["module scripts_user: RuntimeError('Runparts: 1 failures (runcmd) in 1 "
                                      "attempted commands')"]
    assert [w.split(":")[0] for w in report.warnings(asked)] == ["module locale"]


@pytest.mark.parametrize("module", sorted(PLUGIN_MODULES))
def test_what_the_plugin_asks_always_counts(module: str) -> None:
    report = Report.parse(status(init={"errors": [f"('{module}', OSError('x'))"]}))
    assert report.failures(asked_modules(None)) == [f"module {module}: OSError('x')"]


def test_a_stage_that_failed_fails_the_boot() -> None:
    # the datasource (the seed) itself: nothing of what was asked can have happened
    report = Report.parse(status(init_local={"errors": ["Unexpected error crawling NoCloud"]}))
    assert report.failures(asked_modules(None)) == ["init-local: Unexpected error crawling NoCloud"]


def test_recoverable_errors_of_newer_cloud_init_are_warnings() -> None:
    # cloud-init 23.4+ (EL 9.4, kiwi's ost-images): exit status 2 for these
    deprecated = {"recoverable_errors": {"DEPRECATED": ["Key 'ssh_genkeytypes' is deprecated"],
                                         "WARNING": ["No locale found"]}}
    report = Report.parse(status(init=deprecated))
    assert report.failures(asked_modules(None)) == []
    assert report.warnings(asked_modules(None)) == ["DEPRECATED: Key 'ssh_genkeytypes' is deprecated",
                                                    "WARNING: No locale found"]


def test_cloud_config_the_plugin_cannot_read_makes_every_module_count() -> None:
    report = Report.parse(status(modules_config={"errors": [LOCALE]}))
    unreadable = asked_modules("#cloud-config\n: [not yaml\n")
    assert unreadable is None
    assert report.failures(unreadable) != [] and report.warnings(unreadable) == []


def test_not_a_status_record() -> None:
    with pytest.raises(ValueError, match="not cloud-init's status.json"):
        Report.parse("cat: /run/cloud-init/status.json: No such file or directory")
