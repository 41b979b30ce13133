"""Taking r1fleet off one host, as pyinfra runs it: every role's removal (r1fleet/roles/<role>/remove.py), services
first.

    pyinfra inventory.py deploy/remove.py                                   # in a checkout
    pyinfra r1fleet.deploy.inventory:fleet r1fleet.deploy.remove.remove_r1    # from the installed package alone
    pyinfra inventory.py deploy/remove.py --data remove_models=true         # the models too

No probe and no plan: what a host holds of r1fleet's is read from the host, so a host whose hardware changed, or
that no model fits any more, is removed all the same. The models stay unless the host data says `remove_models`.
Bad host data (say `remove_models=maybe`) stops that host, naming the field, before anything on it changes.
"""

from pyinfra import host, state
from pyinfra.facts.server import Kernel

from r1fleet.deploy import summary
from r1fleet.errors import DeployError
from r1fleet.fleet.config import HostConfig
from r1fleet.operations.removal import Removal, apply_removals, remove_empty_directories
from r1fleet.records import INSTALL_ROOT, STATE_DIR
from r1fleet.roles.exposure.remove import ExposureRemoval
from r1fleet.roles.gateway.remove import GatewayRemoval
from r1fleet.roles.gpu_driver.remove import DriverRemoval
from r1fleet.roles.llama_cpp.remove import LlamaCppRemoval
from r1fleet.roles.macos.remove import MacOllamaRemoval
from r1fleet.roles.ollama.remove import OllamaRemoval
from r1fleet.roles.rpc_worker.remove import RpcWorkerRemoval

# Every role's removal runs on every host of its system (a host may hold what an earlier plan put there: a former
# pool worker's rpc-server, the other backend). The exposure's first: it takes its drop-ins out of the services'
# drop-in folders, which the backends' removals then remove once they are empty.
REMOVALS: dict[str, tuple[type[Removal], ...]] = {
    "Linux": (GatewayRemoval, ExposureRemoval, RpcWorkerRemoval, LlamaCppRemoval, OllamaRemoval, DriverRemoval),
    "Darwin": (MacOllamaRemoval,),
}


def remove_r1() -> None:
    """Remove r1fleet from the current pyinfra host (call it from a deploy file)."""
    summary.install(state, done="removed")

    with summary.step(state, host, "remove"):
        settings = HostConfig.from_host_data(host.name, host.data.dict())
        system = host.get_fact(Kernel)
        if system not in REMOVALS:
            raise DeployError(f"r1fleet deploys to and removes from Linux and macOS hosts; this one runs {system!r}",
                              host=host.name, fix="take this host out of the fleet, or run the removal on it by hand")
        removals = [removal(settings) for removal in REMOVALS[system]]

    if summary.ok(host):
        apply_removals(removals)
        # the model folder stays while it holds models (kept, or anyone's)
        remove_empty_directories(name="Remove r1fleet's folders left empty",
                                 paths=(settings.model_dir, STATE_DIR, INSTALL_ROOT),
                                 **({"_sudo": True} if system == "Darwin" else {}))
