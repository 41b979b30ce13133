"""What makes the deploy refuse a host, decided without the host: the one answer the deploy acts on and `r1fleet
plan` and `r1fleet lock` show, so neither promises a host the deploy will stop.

    refusal = deploy_refusal(served, settings, hardware, members)   # None, or the deploy's own error (host, field, fix)

Each check is the decision the deploy makes, called as the deploy calls it: the checks before any change (disk,
exposure, API key), then what each role decides when it is prepared (which Ollama release, which llama.cpp, which
download, a pool member's settings and sources) and the GPU driver's decision. What the host's apt offers is the
probe's reading of it (r1fleet/artifacts/llama_cpp_install.py apt_offer); on a host whose apt lists were never
fetched, a Debian release whose llama.cpp packages versions.yaml names is taken to offer them (but those in sid's
contrib alone), any other host none; a host whose apt lacks a package may still be refused there. So is a
Secure Boot host whose driver's signing key the deploy finds not enrolled (it asks the host).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Mapping

from r1fleet.artifacts.disk import check_disks
from r1fleet.artifacts.llama_cpp_install import apt_offer, llama_cpp_install
from r1fleet.artifacts.ollama_release import OllamaRelease, host_release
from r1fleet.artifacts.pins import model_download, platform_from_hardware
from r1fleet.errors import DeployError, R1FleetError
from r1fleet.fleet.config import HostConfig
from r1fleet.lock.served import Served, rehearsed
from r1fleet.plan.drivers import decide_driver
from r1fleet.records import Hardware
from r1fleet.roles.exposure.decide import exposure_for
from r1fleet.roles.llama_cpp.pool import pool_head
from r1fleet.roles.ollama.decide import imports_stand_in
from r1fleet.roles.rpc_worker.decide import pool_install, rpc_worker


def kind_of(served: Served, system: str) -> str:
    """Which roles the host gets (r1fleet/deploy/serve.py ROLES): a Mac's, a pool member's, or its backend's."""
    if system == "Darwin":
        return "macos"
    if served.role != "alone":
        return served.role
    return served.plan.backend or "ollama"


def check_before_change(served: Served, settings: HostConfig, hardware: Hardware) -> str | None:
    """What refuses a host alone or a pool's head before anything changes on it (R1FleetError naming the reason);
    the exposure's warning otherwise (None when it has none)."""
    plan, host, system = served.plan, hardware.host, hardware.os.system
    darwin = system == "Darwin"
    if not darwin and hardware.os.init not in ("", "systemd"):
        raise DeployError(f"this host is not run by systemd (its PID 1 is {hardware.os.init}), and r1fleet's "
                          "services are systemd units", host=host, field="init",
                          fix="deploy to a machine or VM booted with systemd (a Docker container has none)")
    # 43 GB of model and 3.5-7 GB of runtime never fill a disk
    check_disks(host, plan, hardware, settings.model_dir, imports_stand_in(plan, settings, system),
                runtime_release(served, settings, hardware))
    exposure_for(settings, plan, host, darwin=darwin)
    settings.api_key_text()  # an unreadable api_key_source
    if settings.ollama_registry and darwin:
        raise DeployError("the macOS role pulls its model from registry.ollama.ai itself (or imports the rehearsal "
                          "stand-in): it does not take one from another registry", host=host,
                          field="ollama_registry", fix="remove ollama_registry for this host")
    return settings.exposure_check(plan.backend, host)


def runtime_release(served: Served, settings: HostConfig, hardware: Hardware) -> OllamaRelease | None:
    """The Ollama release the deploy unpacks on a Linux host: an Ollama host's, or the one a llama.cpp host takes
    llama-server from (where apt offers no package with it, as deploy_refusal takes apt's offer to be). A pool's
    members install packages; a Mac unpacks its small archive."""
    if hardware.os.system == "Darwin" or served.role != "alone":
        return None
    platform = platform_from_hardware(hardware)
    if served.plan.backend == "ollama":
        return host_release(served.plan, settings, platform)
    install = llama_cpp_install(platform, served.plan, settings, apt_offer(hardware))
    return install.release if install.method == "ollama-bundle" else None


# What each kind of host's roles decide when they are prepared (their `prepare`), given apt's offer: each raises
# the error that stops the deploy of that host.
Decide = Callable[[Served, HostConfig, Hardware, Mapping[str, HostConfig], set[str]], None]


def _mac(served: Served, settings: HostConfig, hardware: Hardware, members, available) -> None:
    if imports_stand_in(served.plan, settings, "Darwin"):
        model_download(hardware.host, served.plan, settings)


def _ollama(served: Served, settings: HostConfig, hardware: Hardware, members, available) -> None:
    host_release(served.plan, settings, platform_from_hardware(hardware))
    if imports_stand_in(served.plan, settings, hardware.os.system):
        model_download(hardware.host, served.plan, settings)


def _llama_cpp(served: Served, settings: HostConfig, hardware: Hardware, members, available) -> None:
    model_download(hardware.host, served.plan, settings)
    llama_cpp_install(platform_from_hardware(hardware), served.plan, settings, available)


def _head(served: Served, settings: HostConfig, hardware: Hardware, members, available) -> None:
    pool = served.pool
    model_download(hardware.host, served.plan, settings)
    pool_head(pool, settings, served.plan, {w: members[w] for w in pool.workers if w in members})
    pool_install(served.plan, settings, platform_from_hardware(hardware), available, pool.pool, "head")


def _worker(served: Served, settings: HostConfig, hardware: Hardware, members, available) -> None:
    pool = served.pool
    worker = rpc_worker(pool, settings, members[pool.head], hardware)
    pool_install(worker.plan, settings, platform_from_hardware(hardware), available, pool.pool, "worker")


PREPARED: dict[str, Decide] = {"macos": _mac, "ollama": _ollama, "llama.cpp": _llama_cpp, "head": _head,
                               "worker": _worker}


def driver_refusal(hardware: Hardware, served: Served) -> DeployError | None:
    """The GPU driver role's refusal (r1fleet/plan/drivers.py), unless it hangs on a Secure Boot key the deploy
    finds enrolled or not only on the host."""
    if hardware.os.system == "Darwin":
        return None
    action = decide_driver(hardware, served.plan)
    if action.kind != "refuse":
        return None
    if decide_driver(hardware, served.plan, mok_enrolled=True).kind != "refuse":
        return None
    return DeployError(action.reason, host=hardware.host, field="driver", fix=action.fix)


def deploy_refusal(served: Served, settings: HostConfig, hardware: Hardware,
                   members: Mapping[str, HostConfig] | None = None) -> R1FleetError | None:
    """The error the deploy stops this host with, or None. `served` is what the host serves as planned (before a
    rehearsal's stand-in takes the slot: that is applied here, as the deploy applies it); `members` holds a pool
    member's fellow members' settings. A host with no fitting plan is the plan's own answer, not a refusal."""
    if not served.plan.fits or not served.plan.backend:
        return None
    if served.role != "worker" and not served.plan.rehearsal:
        served = replace(served, plan=rehearsed(served.plan, settings))
    try:
        if served.role != "worker":
            check_before_change(served, settings, hardware)
        available = apt_offer(hardware)
        PREPARED[kind_of(served, hardware.os.system)](served, settings, hardware, members or {}, available)
    except R1FleetError as err:
        return err
    return driver_refusal(hardware, served)
