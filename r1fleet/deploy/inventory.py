"""The fleet as pyinfra's inventory, validated before any host is contacted.

    pyinfra inventory.py deploy.py                                   # in a checkout: the two files at the top
    pyinfra r1fleet.deploy.inventory:fleet r1fleet.deploy.serve.serve_r1   # from the installed package alone

Which fleet: $R1FLEET_FLEET (a fleet file path, an Ansible inventory, or `lab`), else inventory/fleet.yml.
An invalid file stops the run here with a message naming the host, the field and the fix; no connection is made.
"""

from __future__ import annotations

import sys
from typing import Any

from r1fleet.errors import R1FleetError
from r1fleet.fleet.file import load_fleet


def fleet() -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """pyinfra's groups: `r1fleet` (every host) plus the fleet file's own groups, each host with its data."""
    try:
        fleet = load_fleet()
        fleet.check_ssh_keys()
        return fleet.pyinfra_groups()
    except R1FleetError as error:
        print(f"r1fleet: the fleet file is invalid, nothing was deployed: {error}", file=sys.stderr)
        raise SystemExit(2) from None
