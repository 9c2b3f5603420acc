"""What cloud-init did with a VM's NoCloud seed, and whether that is a failed boot.

``cloud-init status --wait`` exits non-zero for much that leaves a VM perfectly usable:
since cloud-init 23.4 (EL 9.4+, CentOS 10, today's kiwi-built ost-images) it exits 2
for recoverable errors such as a deprecated key, and every version exits 1 when any
module fails, e.g. ``locale`` on an image without that locale, which nobody asked for.
So the exit status alone decides nothing. cloud-init's own record,
``/run/cloud-init/status.json``, names each stage's errors; a module's error reads
``('<module>', <exception>)``. A boot fails when a stage before the modules failed
(the datasource: the seed itself) or a module failed that the plugin or the suite
asked for: the plugin's identity (host key, hostname, root's key, the bootcmd that
sets machine-id and /etc/hosts) and the modules of the suite's own user-data. Any
other error is reported as a warning and the VM is handed over.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from .seed import UserData

# Run in the guest: waits until cloud-init has finished, then prints `cloud-init status`'s exit status
# and its status.json. `status --wait` alone is not enough: up to 23.x it returns as soon as a stage
# has recorded an error (say, locale's in the config stage) while the final stage, which runs the
# suite's runcmd, is still to come. result.json is written when the final stage ends; without a
# status.json cloud-init did not run at all (disabled), and nothing more comes.
WAIT_COMMAND = """cloud-init status --wait >/dev/null 2>&1
while [ -e /run/cloud-init/status.json ] && [ ! -e /run/cloud-init/result.json ]; do sleep 0.2; done
cloud-init status >/dev/null 2>&1; echo $?
cat /run/cloud-init/status.json"""

# what the plugin's own part of the user-data needs (seed.py): its identity
PLUGIN_MODULES = frozenset({"bootcmd", "set_hostname", "update_hostname", "ssh"})
# the module that acts on a cloud-config key, where it is not named after it
MODULES_OF_KEY = {
    "runcmd": ("runcmd", "scripts_user"),  # runcmd writes the script, scripts_user runs it
    "packages": ("package_update_upgrade_install",),
    "package_update": ("package_update_upgrade_install",),
    "package_upgrade": ("package_update_upgrade_install",),
    "users": ("users_groups",),
    "groups": ("users_groups",),
    "ssh_authorized_keys": ("ssh",),
    "ssh_keys": ("ssh",),
    "chpasswd": ("set_passwords",),
    "password": ("set_passwords",),
    "ssh_pwauth": ("set_passwords",),
    "hostname": ("set_hostname", "update_hostname"),
    "fqdn": ("set_hostname", "update_hostname"),
    "manage_etc_hosts": ("update_etc_hosts",),
    "apt": ("apt_configure",),
    "yum_repos": ("yum_add_repo",),
    "power_state": ("power_state_change",),
    "fs_setup": ("disk_setup",),
    "device_aliases": ("disk_setup",),
    "swap": ("mounts",),
}
# cloud-init names a module as its config lists it: "scripts-user" (22.x, cloud.cfg's spelling),
# "scripts_user" or "cc_scripts_user" (later versions)
_MODULE_ERROR = re.compile(r"^\('(?:cc_)?([A-Za-z0-9_-]+)', (.*)\)$", re.DOTALL)


def asked_modules(user_data: "Optional[UserData]") -> Optional[frozenset[str]]:
    """The modules whose failure fails a boot: the plugin's, and those of the suite's cloud-config
    keys; None (every module) when the suite's cloud-config text cannot be read here."""
    if isinstance(user_data, str):
        try:
            import yaml

            user_data = yaml.safe_load(user_data)
        except Exception:  # noqa: BLE001 - no PyYAML, or text cloud-init reads otherwise: every module counts
            return None
    keys = user_data if isinstance(user_data, dict) else {}
    return PLUGIN_MODULES | {module for key in keys for module in MODULES_OF_KEY.get(str(key), (str(key),))}


@dataclass(frozen=True)
class Report:
    """cloud-init's errors after it finished, by kind."""

    stage_errors: tuple[str, ...] = ()  # a stage itself failed (before or outside the modules)
    module_errors: dict[str, str] = field(default_factory=dict)  # module -> its error
    recoverable: tuple[str, ...] = ()  # cloud-init 23.4+: warnings and deprecations

    @classmethod
    def parse(cls, status_json: str) -> "Report":
        """From /run/cloud-init/status.json (any version since 18.x); ValueError if it is not one."""
        try:
            stages = json.loads(status_json)["v1"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"not cloud-init's status.json: {status_json[:200]!r}") from None
        stage_errors, module_errors, recoverable = [], {}, []
        for name, stage in stages.items():
            if not isinstance(stage, dict):  # "datasource", "stage"
                continue
            for error in stage.get("errors") or []:
                found = _MODULE_ERROR.match(str(error))
                if found:
                    module_errors[found.group(1).replace("-", "_")] = found.group(2)
                else:
                    stage_errors.append(f"{name}: {error}")
            for level, messages in (stage.get("recoverable_errors") or {}).items():
                recoverable += [f"{level}: {message}" for message in messages]
        return cls(tuple(stage_errors), module_errors, tuple(dict.fromkeys(recoverable)))

    def failures(self, asked: Optional[frozenset[str]]) -> list[str]:
        """What makes the boot a failed one: stage errors, and errors of modules that were asked for
        (`asked` None: every module was)."""
        return list(self.stage_errors) + [f"module {m}: {e}" for m, e in self.module_errors.items()
                                          if asked is None or m in asked]

    def warnings(self, asked: Optional[frozenset[str]]) -> list[str]:
        """The rest: errors of modules nobody asked for, and recoverable errors."""
        return [f"module {m}: {e}" for m, e in self.module_errors.items()
                if asked is not None and m not in asked] + list(self.recoverable)
