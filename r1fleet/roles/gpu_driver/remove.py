"""Removing what the GPU driver role keeps for itself: the record of its reboot for a driver.

The driver stays, with what keeps it working and updated: its packages, the repositories and keys r1fleet added
for them, and the nouveau blacklist (docs/remove.md lists them). Taking a GPU's driver away is a decision of its
own, not a side effect of removing r1fleet's services.
"""

from __future__ import annotations

from pyinfra.api import deploy

from r1fleet.operations.removal import Removal, remove_paths
from r1fleet.roles.gpu_driver.decide import REBOOT_MARKER


class DriverRemoval(Removal):
    """The driver role's own record off the host; the driver itself stays."""

    def remove(self) -> None:
        _remove()


@deploy("Remove the GPU driver's record")
def _remove() -> None:
    remove_paths(name="Remove the record of a driver reboot", paths=(REBOOT_MARKER,))
