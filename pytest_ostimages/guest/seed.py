"""cloud-init NoCloud seeds: a small ``cidata`` ISO per VM, made in-process with pycdlib.

For layers that have cloud-init (oVirt's hosted-engine appliance is configured this
way). The seed gives each VM its identity before its SSH first answers: a unique
instance-id and machine-id, its hostname and FQDN, the plugin's ed25519 host key
(the image's are deleted) and root's authorized key. A suite's own user-data (a
dict or cloud-config YAML text) goes in as a second part of a MIME multipart
user-data, which cloud-init merges with the plugin's.
"""

from __future__ import annotations

import io
import json
import uuid
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import TYPE_CHECKING, Any, Optional, Union

from ..errors import OstError, SessionError
from .identity import hosts_line
from .keys import HostKey

if TYPE_CHECKING:
    from ..hypervisor.host import AnyPath

UserData = Union[str, dict[str, Any]]


def user_data(hostname: str, fqdn: str, ip: str, authorized_key: str, host_key: HostKey,
              machine_id: str, extra: Optional[UserData]) -> str:
    """The user-data: the plugin's cloud-config, then the suite's, as MIME multipart."""
    ours = {
        "hostname": hostname, "fqdn": fqdn, "prefer_fqdn_over_hostname": False,
        "disable_root": False, "ssh_authorized_keys": [authorized_key],
        "ssh_deletekeys": True, "ssh_genkeytypes": [],
        "ssh_keys": {"ed25519_private": host_key.private, "ed25519_public": host_key.public},
        # systemd read the image's machine-id before cloud-init ran: give it this VM's own
        "bootcmd": [["sh", "-c", f"echo {machine_id} >/etc/machine-id"],
                    ["sh", "-c", hosts_line(ip, hostname, fqdn)]],
    }
    message = MIMEMultipart()
    parts = [ours] + ([extra] if extra is not None else [])
    for part in parts:
        text = part if isinstance(part, str) else "#cloud-config\n" + json.dumps(part, indent=1)
        if not text.startswith("#cloud-config"):
            raise OstError(f"user_data must be a dict or cloud-config text starting with "
                           f"'#cloud-config'; got {text[:40]!r}")
        message.attach(MIMEText(text, "cloud-config"))
    return message.as_string()


def write_seed(path: "AnyPath", fqdn: str, ip: str, authorized_key: str, host_key: HostKey,
               extra: Optional[UserData] = None) -> str:
    """Write the seed ISO for one VM, named `fqdn` (its first label the host name, as VM.identity
    sets it without cloud-init); returns its instance-id."""
    hostname = fqdn.split(".")[0]
    try:
        import pycdlib
    except ImportError:
        raise SessionError("This layer has cloud-init, and its NoCloud seed is made with pycdlib, which is "
                       "not installed: pip install 'pytest-ostimages[cloud-init]' (or pycdlib), or "
                       "--ost-cloud-init=off to treat the layer as one without cloud-init.") from None
    instance_id = f"ost-{uuid.uuid4()}"
    files = {
        "meta-data": f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n",
        "user-data": user_data(hostname, fqdn, ip, authorized_key, host_key, uuid.uuid4().hex, extra),
    }
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, text in files.items():
        data = text.encode()
        iso.add_fp(io.BytesIO(data), len(data), f"/{name.replace('-', '').upper()}.;1",
                   rr_name=name, joliet_path=f"/{name}")
    image = io.BytesIO()
    iso.write_fp(image)
    iso.close()
    path.write_bytes(image.getvalue())  # on the hypervisor, where its VM runs
    # it holds the VM's private host key: only ours; libvirt gives it to qemu's user while the VM runs
    path.chmod(0o600)
    return instance_id
