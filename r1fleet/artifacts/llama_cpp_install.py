"""Where a host's llama-server comes from: Debian's package, the llama-server inside the pinned Ollama archive,
or a pinned source build, and what each needs to run there."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from r1fleet.artifacts.ollama_release import OllamaRelease, ollama_release
from r1fleet.errors import DeployError
from r1fleet.artifacts.pins import OllamaBundlePins, Pins, Platform, load_pins
from r1fleet.fleet.config import HostConfig
from r1fleet.records import INSTALL_ROOT, HostPlan

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
