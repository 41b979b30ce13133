"""The whole r1fleet deploy of one host, as pyinfra runs it: probe -> plan -> roles.

A pyinfra user calls it from their own deploy file, as with any packaged pyinfra deploy:

    from r1fleet.roles.serve import serve_r1

    serve_r1()

All decisions live in r1fleet (pure, tested); this only wires them to the host: plan, then the roles
(driver, exposure, backend; macOS: one LaunchDaemon role) in stages (r1fleet/roles/stages.py).
"""

from pyinfra import host, state

from r1fleet.config import HostConfig
from r1fleet.plan_format import format_plan
from r1fleet.roles.artifacts import ModelDownload, check_disk, model_download, platform_from_hardware
from r1fleet.facts import R1Probe
from r1fleet.hardware import parse_probe
from r1fleet.lock import effective_plan, lock_path, read_lock, relock_fleet
from r1fleet.models import Hardware, HostPlan
from r1fleet.planner import rehearse
from r1fleet.roles import exposure, summary
from r1fleet.roles.exposure import ExposureRole
from r1fleet.roles.gpu_driver import DriverRole
from r1fleet.roles.macos import MacOllamaRole
from r1fleet.roles.stages import Role, apply_roles
from r1fleet.roles.llama_cpp import LlamaCppRole, choose_install
from r1fleet.roles.llama_cpp.decide import LlamaInstall
from r1fleet.roles.ollama import OllamaRole, release_for
from r1fleet.roles.ollama.decide import OllamaRelease


def deployed_plan(hardware: Hardware, settings: HostConfig, fleet: str | None) -> HostPlan:
    """The fleet lock's plan for this host when the fleet has a lock that names it (LockMismatch, naming the
    differences and the relock command, when the hardware changed), else today's plan."""
    lock = read_lock(lock_path(fleet)) if fleet else None
    return effective_plan(hardware, settings.policy, lock, relock_fleet(fleet) if fleet else None)


def serve_r1() -> None:
    """Probe, plan and deploy the current pyinfra host (call it from a deploy file)."""
    summary.install(state)

    with summary.step(state, host, "plan"):
        settings = HostConfig.from_host_data(host.name, host.data.dict())
        hardware = parse_probe(host.get_fact(R1Probe, model_dir=settings.model_dir), host.name)  # one round trip
        plan = deployed_plan(hardware, settings, host.data.get("r1fleet_fleet"))
        if settings.rehearsal and plan.fits:
            plan = rehearse(plan)
        print(format_plan(plan, settings.rehearsal))
        if not plan.fits or not plan.backend:
            raise ValueError("no model fits this host; see the plan's reasons")
        check_disk(host.name, plan, hardware)  # a 43 GB download never fills the disk
        on_macos = hardware.os.system == "Darwin"
        exposure.exposure_for(settings, plan, host.name, darwin=on_macos)  # refused before any change
        settings.api_key_text()  # an unreadable api_key_source fails this host before any change
        if warning := settings.exposure_check(plan.backend, host.name):
            print(f"[{host.name}]   {warning}")
        needs_gguf = settings.rehearsal or plan.backend == "llama.cpp"
        download = model_download(host.name, plan, settings) if needs_gguf else None
        release = install = None
        if not on_macos:
            platform = platform_from_hardware(hardware)
            release = release_for(plan, settings, platform) if plan.backend == "ollama" else None
            install = choose_install(plan, settings, platform) if plan.backend == "llama.cpp" else None

    if summary.ok(host):
        apply_roles(roles_for(plan, settings, hardware, download, release, install))


def roles_for(plan: HostPlan, settings: HostConfig, hardware: Hardware, download: ModelDownload | None,
              release: OllamaRelease | None, install: LlamaInstall | None) -> list[Role]:
    """The host's roles in their order: the driver, then the exposure (its firewall is active before the
    backend starts), then the backend. A Mac has one role, its LaunchDaemon Ollama."""
    if hardware.os.system == "Darwin":
        return [MacOllamaRole(plan, settings, hw=hardware, download=download)]
    backend = (OllamaRole(plan, settings, release, download) if plan.backend == "ollama"
               else LlamaCppRole(plan, settings, install, download))
    return [DriverRole(hardware, plan), ExposureRole(settings, plan), backend]
