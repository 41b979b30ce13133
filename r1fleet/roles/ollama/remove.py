"""Removing what the Ollama role wrote: r1fleet-ollama.service and r1fleet-ollama-preload.service (its record is in
the account's home, which goes with the account), the releases under /opt/r1fleet/ollama (the
llama.cpp role's bundled llama-server among them) and the `ollama` link on PATH into them, the `ollama` account
when r1fleet made or took it over, and its bookkeeping beside the models (download stamps, unfinished downloads,
the stand-in's Modelfile and import record); the models themselves stay unless the host data says
`remove_models`.

An official install r1fleet took over (roles/ollama/takeover.py) is not put back: its binary was removed then, and
its models are in r1fleet's store, kept like the others. Its unit is unmasked, so Ollama's install script can set
it up again, with the drop-ins the user wrote for it, which stayed in place.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy, operation

from r1fleet.artifacts.ollama_release import OLLAMA_ROOT
from r1fleet.fleet.config import HostConfig
from r1fleet.operations.removal import (
    DOWNLOAD_LEFTOVERS,
    Removal,
    models_kept_or_removed,
    remove_link_into,
    remove_paths,
    remove_service_account,
    remove_unit,
    stop_unit,
)
from r1fleet.render.systemd_unit import OLLAMA_UNIT
from r1fleet.roles.ollama.decide import HOME, IMPORT_RECORD, MODELFILE, PRELOAD_UNIT, USER, import_dir, ollama_models_dir
from r1fleet.roles.ollama.registry import INCOMING
from r1fleet.roles.ollama.official import OfficialOllama, UNIT_DIR
from r1fleet.roles.ollama.takeover import OFFICIAL_BINARY, OFFICIAL_UNIT, OfficialInstall


class OllamaRemoval(Removal):
    """Ollama, its releases and its account off the host; its models kept or removed."""

    def stop(self) -> None:
        _stop()

    def remove(self) -> None:
        _remove(self.settings)


@deploy("Remove Ollama")
def _stop() -> None:
    stop_unit(name=f"Stop {PRELOAD_UNIT}", unit=PRELOAD_UNIT)
    stop_unit(name=f"Stop {OLLAMA_UNIT}", unit=OLLAMA_UNIT)


@deploy("Remove Ollama")
def _remove(settings: HostConfig) -> None:
    remove_unit(name=f"Remove {PRELOAD_UNIT}", unit=PRELOAD_UNIT)
    remove_unit(name=f"Remove {OLLAMA_UNIT}", unit=OLLAMA_UNIT)
    remove_link_into(name=f"Remove the link {OFFICIAL_BINARY}", path=OFFICIAL_BINARY, root=OLLAMA_ROOT)
    remove_paths(name=f"Remove {OLLAMA_ROOT}", paths=(OLLAMA_ROOT,))
    ollama_models(settings)
    remove_service_account(name=f"Remove the account {USER}", account=USER, home=HOME)
    unmask_official_unit(name=f"Unmask {OFFICIAL_UNIT}")


@operation()
def unmask_official_unit():
    """Take away the mask the deploy put on Ollama's own unit (a link to /dev/null in /etc/systemd/system), so
    that Ollama's install script can start its server again."""
    found: OfficialOllama = host.get_fact(OfficialInstall)
    if not (found.masked and found.fragment == f"{UNIT_DIR}/{OFFICIAL_UNIT}"):
        host.noop(f"{OFFICIAL_UNIT} is not masked in {UNIT_DIR}")
        return
    yield f"systemctl unmask {OFFICIAL_UNIT}"


def ollama_models(settings: HostConfig, **arguments) -> None:
    """The Ollama store and the stand-in's import folder, kept (without r1fleet's bookkeeping) or removed;
    `arguments`: pyinfra's own (the macOS removal's `_sudo`)."""
    verb = "Remove" if settings.remove_models else "Keep"
    store, imports = ollama_models_dir(settings), import_dir(settings)
    # in the store: a registry download r1fleet had not finished moving in (Ollama's own files stay)
    models_kept_or_removed(name=f"{verb} the models in {store}", path=store, remove=settings.remove_models,
                           leftovers=(INCOMING, *DOWNLOAD_LEFTOVERS), **arguments)
    models_kept_or_removed(name=f"{verb} the models in {imports}", path=imports, remove=settings.remove_models,
                           leftovers=(MODELFILE, IMPORT_RECORD, f"{IMPORT_RECORD}.tmp", *DOWNLOAD_LEFTOVERS),
                           **arguments)
