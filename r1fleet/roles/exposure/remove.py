"""Removing what the exposure role wrote: the firewall unit and the drop-ins that make the services require it,
r1fleet's nftables table, its ufw rules, and /etc/r1fleet (the rules files and the API key r1fleet generated or
installed there; a key file named elsewhere by host data `api_key_file` stays).

It runs after every service has stopped (r1fleet/operations/removal.py), so no service is open without its filter.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy, operation

from r1fleet.operations.removal import Removal, remove_paths, remove_unit, stop_unit
from r1fleet.roles.exposure.decide import FIREWALL_UNIT, KEY_DIR, SERVICE_UNITS, UFW_REMOVE_OURS, firewall_drop_in
from r1fleet.roles.exposure.role import UfwRules, remove_nft_table


@operation()
def remove_ufw_rules():
    """Delete every ufw rule r1fleet added (comment "r1fleet", or "r1fleet-hold" from an apply cut short), active
    or not; the host's own rules stay."""
    rules = host.get_fact(UfwRules)
    if not rules.get("count") and not rules.get("ports"):
        host.noop("no r1fleet ufw rule")
        return
    yield UFW_REMOVE_OURS


class ExposureRemoval(Removal):
    """The exposure role's firewall and configuration, off the host."""

    def remove(self) -> None:
        _remove()


@deploy("Remove the exposure")
def _remove() -> None:
    # stopping the unit deletes the table (its ExecStop); the table is checked again below all the same
    stop_unit(name=f"Stop {FIREWALL_UNIT}", unit=FIREWALL_UNIT)
    # before the backends' removals, which remove their units' drop-in folders once they are empty
    remove_paths(name="Remove the services' firewall requirement",
                 paths=tuple(firewall_drop_in(backend) for backend in SERVICE_UNITS))
    remove_unit(name=f"Remove {FIREWALL_UNIT}", unit=FIREWALL_UNIT)
    remove_nft_table(name="Remove the nftables table inet r1fleet")
    remove_ufw_rules(name="Remove r1fleet's ufw rules")
    remove_paths(name=f"Remove {KEY_DIR}", paths=(KEY_DIR,))
