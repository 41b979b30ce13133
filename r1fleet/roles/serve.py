"""The whole r1fleet deploy of one host, as pyinfra runs it: probe -> plan -> roles.

A pyinfra user calls it from their own deploy file, as with any packaged pyinfra deploy:

    from r1fleet.roles.serve import serve_r1

    serve_r1()

All decisions live in r1fleet (pure, tested); this only wires them to the host. Order per host:
driver -> exposure key -> firewall -> backend (macOS: one LaunchDaemon role).
"""

from pyinfra import host, state

from r1fleet.config import HostConfig, ollama_exposure_warning
from r1fleet.plan_format import format_plan
from r1fleet.roles.artifacts import check_disk, model_download, platform_from_hardware
from r1fleet.facts import R1Probe
from r1fleet.hardware import parse_probe
from r1fleet.planner import plan_host, rehearse
from r1fleet.roles.fact_batch import prefetch
from r1fleet.roles import exposure, gpu_driver, macos, summary
from r1fleet.roles.llama_cpp import choose_install, llama_cpp_reads, llama_cpp_role
from r1fleet.roles.ollama import ollama_reads, ollama_role, release_for


def serve_r1() -> None:
    """Probe, plan and deploy the current pyinfra host (call it from a deploy file)."""
    summary.install(state)

    with summary.step(state, host, "plan"):
        settings = HostConfig.from_host_data(host.name, host.data.dict())
        hardware = parse_probe(host.get_fact(R1Probe, model_dir=settings.model_dir), host.name)  # one round trip
        plan = plan_host(hardware, settings.policy)
        if settings.rehearsal and plan.fits:
            plan = rehearse(plan)
        print(format_plan(plan, settings.rehearsal))
        if not plan.fits or not plan.backend:
            raise ValueError("no model fits this host; see the plan's reasons")
        check_disk(host.name, plan, hardware)  # a 43 GB download never fills the disk
        on_macos = hardware.os.system == "Darwin"
        exposure.exposure_for(settings, plan, host.name, darwin=on_macos)  # bad listen/allow fails before any change
        if plan.backend == "ollama" and (warning := ollama_exposure_warning(settings.listen, settings.allow)):
            print(f"[{host.name}]   {warning}")
        needs_gguf = settings.rehearsal or plan.backend == "llama.cpp"
        download = model_download(host.name, plan, settings) if needs_gguf else None
        if not on_macos:
            platform = platform_from_hardware(hardware)
            release = release_for(plan, settings, platform) if plan.backend == "ollama" else None
            install = choose_install(plan, settings, platform) if plan.backend == "llama.cpp" else None

    if summary.ok(host) and not on_macos:  # everything the roles read, in one round trip
        backend_reads = (ollama_reads(plan, settings, release, download) if plan.backend == "ollama"
                         else llama_cpp_reads(plan, settings, install, download))
        prefetch([*exposure.exposure_reads(settings, plan), *backend_reads])
    if summary.ok(host) and on_macos:
        macos.install(plan, settings, hw=hardware, download=download)
    elif summary.ok(host):
        gpu_driver.install(hardware, plan)
        exposure.prepare(settings, plan)
        exposure.apply(settings, plan)  # closed before open: the filter exists before the service binds the LAN
        if plan.backend == "ollama":
            ollama_role(plan, settings, release, download)
        else:
            llama_cpp_role(plan, settings, install, download)
