"""Removing what the gateway role wrote: r1fleet-gateway.service, its firewall unit, rules and table (`inet
r1fleet-gateway`), and /etc/r1fleet/gateway (configuration, /v1/models, the client key). Debian's haproxy package
stays installed; its own haproxy.service, which the deploy masked, is unmasked again, stopped and disabled (see
docs/gateway.md)."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy, operation
from pyinfra.facts.files import Link

from r1fleet.operations.removal import Removal, remove_paths, remove_unit, stop_unit
from r1fleet.roles.exposure.role import remove_nft_table
from r1fleet.roles.gateway.decide import DISTRO_UNIT, DISTRO_UNIT_MASK, FIREWALL_UNIT, GATEWAY_DIR, GATEWAY_UNIT, NFT_TABLE


class GatewayRemoval(Removal):
    """The gateway and its firewall, off the host (a host that never ran one: nothing to do)."""

    def stop(self) -> None:
        _stop()

    def remove(self) -> None:
        _remove()


@deploy("Remove the gateway")
def _stop() -> None:
    stop_unit(name=f"Stop {GATEWAY_UNIT}", unit=GATEWAY_UNIT)


@deploy("Remove the gateway")
def _remove() -> None:
    # the firewall only now that the gateway has stopped; stopping it deletes its table (ExecStop)
    stop_unit(name=f"Stop {FIREWALL_UNIT}", unit=FIREWALL_UNIT)
    remove_unit(name=f"Remove {GATEWAY_UNIT}", unit=GATEWAY_UNIT)
    remove_unit(name=f"Remove {FIREWALL_UNIT}", unit=FIREWALL_UNIT)
    remove_nft_table(name=f"Remove the nftables table inet {NFT_TABLE}", table=NFT_TABLE)
    remove_paths(name=f"Remove {GATEWAY_DIR}", paths=(GATEWAY_DIR,))
    unmask(name=f"Unmask {DISTRO_UNIT}")


@operation()
def unmask():
    """Take away the deploy's mask of the package's own unit (a link to /dev/null, r1fleet's by its target)."""
    found = host.get_fact(Link, path=DISTRO_UNIT_MASK)  # None: no such path; False: not a link (the user's own unit)
    if not found or found.get("link_target") != "/dev/null":
        host.noop(f"{DISTRO_UNIT} is not masked")
        return
    yield f"rm -f {DISTRO_UNIT_MASK} && systemctl daemon-reload"
