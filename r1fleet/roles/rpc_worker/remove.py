"""Removing what the pool worker role wrote: rpc-server's unit, its firewall unit, rules and table
(`inet r1fleet-rpc`), and the `ggml-rpc` account. Debian's packages it installed stay (see docs/remove.md)."""

from __future__ import annotations

from pyinfra.api import deploy

from r1fleet.operations.removal import Removal, remove_paths, remove_service_account, remove_unit, stop_unit
from r1fleet.roles.exposure.role import remove_nft_table
from r1fleet.roles.rpc_worker.decide import HOME, RPC_FIREWALL_UNIT, RPC_RULES_FILE, RPC_TABLE, RPC_UNIT, USER


class RpcWorkerRemoval(Removal):
    """A pool worker's rpc-server and its firewall, off the host."""

    def stop(self) -> None:
        _stop()

    def remove(self) -> None:
        _remove()


@deploy("Remove the RPC worker")
def _stop() -> None:
    stop_unit(name=f"Stop {RPC_UNIT}", unit=RPC_UNIT)


@deploy("Remove the RPC worker")
def _remove() -> None:
    # the firewall only now that rpc-server has stopped; stopping it deletes its table (ExecStop)
    stop_unit(name=f"Stop {RPC_FIREWALL_UNIT}", unit=RPC_FIREWALL_UNIT)
    remove_unit(name=f"Remove {RPC_UNIT}", unit=RPC_UNIT)
    remove_unit(name=f"Remove {RPC_FIREWALL_UNIT}", unit=RPC_FIREWALL_UNIT)
    remove_nft_table(name=f"Remove the nftables table inet {RPC_TABLE}", table=RPC_TABLE)
    remove_paths(name="Remove the RPC firewall rules", paths=(RPC_RULES_FILE,))
    remove_service_account(name=f"Remove the account {USER}", account=USER, home=HOME)
