"""Removing what the llama.cpp role wrote: r1fleet-llama-server.service, a source build under /opt/r1fleet/llama.cpp,
the `llama` account, and the GGUF's stamp; the GGUF itself stays unless the host data says `remove_models`.
(The pinned Ollama archive it may run llama-server from is the Ollama role's removal; Debian's packages stay.)"""

from __future__ import annotations

from pyinfra.api import deploy

from r1fleet.artifacts.llama_cpp_install import LLAMA_ROOT
from r1fleet.fleet.config import HostConfig
from r1fleet.operations.removal import (
    Removal,
    models_kept_or_removed,
    remove_paths,
    remove_service_account,
    remove_unit,
    stop_unit,
)
from r1fleet.render.systemd_unit import LLAMA_UNIT
from r1fleet.roles.llama_cpp.decide import HOME, USER, llama_models_dir


class LlamaCppRemoval(Removal):
    """llama-server, its build and its account off the host; its model kept or removed."""

    def stop(self) -> None:
        _stop()

    def remove(self) -> None:
        _remove(self.settings)


@deploy("Remove llama.cpp")
def _stop() -> None:
    stop_unit(name=f"Stop {LLAMA_UNIT}", unit=LLAMA_UNIT)


@deploy("Remove llama.cpp")
def _remove(settings: HostConfig) -> None:
    remove_unit(name=f"Remove {LLAMA_UNIT}", unit=LLAMA_UNIT)
    remove_paths(name=f"Remove {LLAMA_ROOT}", paths=(LLAMA_ROOT,))
    models = llama_models_dir(settings)
    models_kept_or_removed(name=f"{'Remove' if settings.remove_models else 'Keep'} the models in {models}",
                           path=models, remove=settings.remove_models)
    remove_service_account(name=f"Remove the account {USER}", account=USER, home=HOME)
