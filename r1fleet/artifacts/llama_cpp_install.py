"""Where a host's llama-server comes from: Debian's package, the llama-server inside the pinned Ollama archive,
or a pinned source build, and what each needs to run there."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from r1fleet.artifacts.ollama_release import OllamaRelease, ollama_release
from r1fleet.errors import DeployError
from r1fleet.artifacts.pins import OllamaBundlePins, Pins, Platform, load_pins, platform_from_hardware
from r1fleet.fleet.config import HostConfig
from r1fleet.records import INSTALL_ROOT, Hardware, HostPlan

LLAMA_ROOT = f"{INSTALL_ROOT}/llama.cpp"


@dataclass(frozen=True)
class LlamaInstall:
    """Where llama-server comes from on this host, and what it needs to run there."""

    method: Literal["package", "ollama-bundle", "source"]
    packages: tuple[str, ...]
    binary: str
    tag: str | None = None
    cmake_flags: tuple[str, ...] = ()
    release: OllamaRelease | None = None  # ollama-bundle: the pinned archive(s) it is unpacked from
    environment: tuple[tuple[str, str], ...] = ()  # library and GPU backend paths for the unit
    required_flags: tuple[str, ...] = ()


def cuda_architectures(compute_caps: list[str]) -> str:
    """['8.6', '8.9'] -> '86;89' (CMAKE_CUDA_ARCHITECTURES)."""
    archs = sorted({cap.replace(".", "") for cap in compute_caps if re.fullmatch(r"\d+\.\d+", cap)}, key=int)
    return ";".join(archs)


def cmake_flags(plan: HostPlan, build: str) -> tuple[str, ...]:
    flags = [
        "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
        # No web UI: its build step fetches an unpinned "latest" bundle (scripts/ui-assets.cmake).
        "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
        # A release tarball has no git: name the build, or /props reports b0-unknown (cmake/build-info.cmake).
        f"-DLLAMA_BUILD_NUMBER={build.lstrip('b')}",
    ]
    if plan.uses_gpu and plan.vendor == "nvidia":
        archs = cuda_architectures(plan.compute_caps) or "native"
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
    elif plan.uses_gpu and plan.vendor == "amd":
        flags += ["-DGGML_HIP=ON"]
    elif plan.uses_gpu and plan.vendor == "intel":
        flags += ["-DGGML_VULKAN=ON"]
    return tuple(flags)


def bundle_backend(platform: Platform, plan: HostPlan, bundle: OllamaBundlePins) -> str | None:
    """The GPU backend library (relative to lib/ollama) the plan needs; None on the CPU."""
    if not plan.uses_gpu:
        return None
    if plan.vendor == "nvidia" and platform.tegra_major in bundle.jetson_backends:
        return bundle.jetson_backends[platform.tegra_major]
    return bundle.backends.get(plan.vendor or "")


def llama_cpp_install(
    platform: Platform,
    plan: HostPlan,
    settings: HostConfig,
    available: set[str],
    pins: Pins | None = None,
) -> LlamaInstall:
    """The distro package where it ships llama-server with the plan's GPU backend (Debian forky/sid),
    else the llama-server inside the pinned Ollama archive; a source build only when asked for.

    `available` = package names the host's apt can install. A lab host (settings.profile set)
    only simulates its GPUs, so the CPU package is what can really run there.
    """
    pins = pins or load_pins()
    llama = pins.llama_cpp
    debian = llama.debian
    gpu = plan.uses_gpu
    backend_pkg = debian.backend_packages.get(plan.vendor) if gpu else None
    package_distro = platform.distro_id == "debian" and platform.codename in debian.codenames
    server_ok = debian.server_package in available
    wants = settings.llama_cpp_install
    simulated = settings.profile is not None
    if wants == "package" or (wants == "auto" and package_distro and server_ok):
        packages = [debian.server_package]
        if backend_pkg and backend_pkg in available:
            packages.append(backend_pkg)
        if wants == "package" or simulated or not gpu or backend_pkg in available:
            return LlamaInstall(method="package", packages=tuple(packages), binary=debian.server_binary)
    if wants == "source":
        tag = llama.tag
        return LlamaInstall(
            method="source",
            packages=("build-essential", "cmake", "curl", "ca-certificates"),
            binary=f"{LLAMA_ROOT}/{tag}/bin/llama-server",
            tag=tag,
            cmake_flags=cmake_flags(plan, tag),
        )
    bundle = llama.ollama_bundle
    release = ollama_release(plan.host, platform, plan, settings.ollama_release, pins)
    libraries = f"{release.install_dir}/{bundle.library_dir}"
    environment = {"LD_LIBRARY_PATH": libraries, "OLLAMA_LLAMA_CPP_COMPAT": "0"}
    backend = bundle_backend(platform, plan, bundle)
    if gpu and backend is None:
        raise DeployError(
            f"the pinned Ollama archive has no llama.cpp backend for {plan.vendor} GPUs",
            host=plan.host, field="backend", fix="force backend: ollama for this host, or llama_cpp_install: source",
        )
    if backend:
        backend_dir = f"{libraries}/{backend.rsplit('/', 1)[0]}"
        # Ollama's bundle loads its GPU backend only through GGML_BACKEND_PATH; the CUDA runtime sits beside it.
        environment["LD_LIBRARY_PATH"] = f"{libraries}:{backend_dir}"
        environment["GGML_BACKEND_PATH"] = f"{libraries}/{backend}"
    return LlamaInstall(
        method="ollama-bundle",
        packages=("zstd",) if release.needs_zstd else (),
        binary=f"{release.install_dir}/{bundle.server}",
        tag=bundle.llama_cpp_build,
        release=release,
        environment=tuple(sorted(environment.items())),
        required_flags=bundle.required_flags,
    )


# ---------------------------------------------------------------------------------------------
# What a host's apt offers, and whether its llama.cpp can take part in a pool


def llama_cpp_packages(pins: Pins | None = None) -> tuple[str, ...]:
    """Every Debian llama.cpp package r1fleet asks apt about."""
    debian = (pins or load_pins()).llama_cpp.debian
    return (debian.server_package, *debian.backend_packages.values(), debian.rpc_server_package,
            debian.rpc_backend_package)


def apt_offer(hardware: Hardware, pins: Pins | None = None) -> set[str]:
    """The llama.cpp packages this host's apt offers, as far as known without asking it: the probe's reading when
    the host's apt lists were fetched; else every package r1fleet asks for on the Debian releases versions.yaml
    names for them, but those in sid's contrib alone (versions.yaml sid_contrib_only); none elsewhere. The deploy
    asks apt itself."""
    debian = (pins or load_pins()).llama_cpp.debian
    if hardware.os.system == "Darwin":
        return set()
    if hardware.llama_cpp_apt is not None and hardware.llama_cpp_apt.lists:
        return set(hardware.llama_cpp_apt.candidates) & set(llama_cpp_packages(pins))
    try:
        platform = platform_from_hardware(hardware)
    except DeployError:
        return set()
    if platform.distro_id == "debian" and platform.codename in debian.codenames:
        return set(llama_cpp_packages(pins)) - set(debian.sid_contrib_only)
    return set()


def pool_source_problem(host: str, pool: str, role: str, platform: Platform, vendor: str | None, settings: HostConfig,
                        available: set[str], lists_read: bool = True, pins: Pins | None = None) -> tuple[str, str] | None:
    """Why this member's llama.cpp cannot take part in pool `pool` as its `role` ("head" or "worker"), and what would
    make it possible; None when it can. The one decision `r1fleet plan` (which then keeps the pool separate) and the
    deploy (which refuses the member) both take. A pool's pieces come from Debian's packages alone: the pinned
    Ollama archive has neither ggml's rpc-server nor its RPC backend (ollama llama/server/CMakeLists.txt installs
    llama-server and llama-quantize only; no GGML_RPC in llama/server/CMakePresets.json), and a source build
    (llama_cpp_install: source) builds llama-server without GGML_RPC and no rpc-server. `available`: the packages
    its apt offers (apt_offer, or the deploy's apt facts); `lists_read`: False when they are apt_offer's assumption."""
    debian = (pins or load_pins()).llama_cpp.debian
    out = f"take {host} out of pool {pool}"
    if settings.llama_cpp_install == "source":
        return (f"{host}'s source build (llama_cpp_install: source) has llama-server without the RPC backend, and no "
                "rpc-server", f"set llama_cpp_install: auto (or package) for {host}, or {out}")
    debian_release = platform.distro_id == "debian" and platform.codename in debian.codenames
    if not debian_release and settings.llama_cpp_install != "package":
        where = f"{platform.distro_id or 'an unknown system'} {platform.codename}".strip()
        return (f"{host} runs {where}: a pool's rpc-server and RPC backend come from Debian {' or '.join(debian.codenames)}'s "
                "packages alone (the Ollama archive has neither)", f"run {host} on Debian forky or sid, or {out}")
    needs = [debian.server_package if role == "head" else debian.rpc_server_package, debian.rpc_backend_package]
    backend = debian.backend_packages.get(vendor or "")
    if vendor and settings.profile is None:  # a lab host's GPUs are simulated: its CPU backend serves them
        needs.append(backend or f"a ggml backend for {vendor} GPUs")
    missing = [p for p in needs if p not in available]
    if not missing:
        return None
    why = f"apt on {host} offers no {', '.join(missing)}"
    contrib = [p for p in missing if p in debian.sid_contrib_only]
    if contrib:
        why += f" ({', '.join(contrib)} is in Debian sid's contrib alone)"
    if not lists_read:
        why += ", as far as r1fleet knows without the host's apt lists"
    fix = (f"on {host}, add Debian sid with contrib to its apt sources, run apt-get update and plan again, or {out}"
           if contrib else f"run apt-get update on {host} (Debian forky or sid) and plan again, or {out}")
    return why, fix


def pool_source_problems(pool: str, head: str, members: dict[str, tuple[Hardware, HostConfig]],
                         pins: Pins | None = None) -> dict[str, str]:
    """{member: why it cannot take part, and what would make it possible} for each member whose llama.cpp cannot
    (pool_source_problem, with what the probes say its apt offers): what `r1fleet plan` and the deploy keep the
    pool separate for."""
    problems = {}
    for host, (hardware, settings) in members.items():
        try:
            platform = platform_from_hardware(hardware)
        except DeployError as err:
            problems[host] = f"{host}: {err.message} (to pool it: {err.fix})"
            continue
        vendor = next((g.vendor for g in hardware.gpus), None)
        lists = hardware.llama_cpp_apt is not None and hardware.llama_cpp_apt.lists
        problem = pool_source_problem(host, pool, "head" if host == head else "worker", platform, vendor, settings,
                                      apt_offer(hardware, pins), lists, pins)
        if problem:
            problems[host] = f"{problem[0]} (to pool it: {problem[1]})"
    return problems
