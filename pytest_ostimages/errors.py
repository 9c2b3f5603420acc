"""Errors a person can act on.

Every message says what was expected, what was found and what to do next. The
plugin turns an OstError into a short test error without a traceback from inside
the plugin. Two kinds, on purpose:

- :class:`SessionError`: what makes every VM of the session impossible (the images,
  their key, the templates, libvirt, the host, the work root). It is reported in full
  once and stops the session: every later test would only repeat it.
- any other :class:`OstError` (a VM that does not boot, a command that fails, a VM
  asked for twice): it fails the tests that need what failed; the others go on.
"""


class OstError(Exception):
    """A problem with the images, the host or the VMs that the user can fix."""


class SessionError(OstError):
    """A problem that makes every VM of the session impossible: it stops the session."""


class ImageError(SessionError):
    """An image, its backing chain or its SSH key cannot be used."""


class VirtError(SessionError):
    """libvirt is missing, unreachable or refused to create something."""


class BootError(OstError):
    """A VM did not become reachable over SSH."""


class QemuCrashed(BootError):
    """A VM's qemu process died while the VM booted (a signal, an abort): the hypervisor's fault, not the image's."""


class VMError(OstError):
    """A running VM died or stopped answering during a test."""


class SSHCommandError(OstError):
    """A command run with ``check=True`` exited non-zero."""


class WarmStartError(OstError):
    """A saved state could not be restored; the VM is booted instead."""
