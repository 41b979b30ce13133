"""The llama.cpp role's decisions, made without a host: where llama-server comes from, its arguments and
environment, and what makes a host's llama-server unfit to start."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from r1fleet.fleet.config import HostConfig
from r1fleet.records import HostPlan
from r1fleet.artifacts.pins import DeployError, Platform, lab_gpu_devices, load_versions
from r1fleet.roles.ollama.decide import OllamaRelease, ollama_release
from r1fleet.operations.systemd_unit import uses_gpu


LLAMA_ROOT = "/opt/r1fleet/llama.cpp"
# systemd loads the API key as a credential: the file stays root-only on disk and the
# service reads it from its private credentials directory (%d); the key never enters argv.
API_KEY_CREDENTIAL = "api-key"


def _ts(values: list[int]) -> str:
    return ",".join(str(v) for v in values)


def is_reasoning_model(plan: HostPlan) -> bool:
    from r1fleet.plan.catalog import load_catalog

    return bool(plan.model) and load_catalog().find(plan.model).reasoning


def llama_server_args(plan: HostPlan, settings: HostConfig, model_path: str, api_key_path: str | None,
                      rpc_servers: Sequence[str] = ()) -> list[str]:
    """llama-server arguments for the plan (research/placement.md section 1).

    api_key_path is where the service reads the key (the credentials directory), never the key. rpc_servers: a
    pool head's workers (host:port, in the pool's order); the plan's split then covers their devices first.
    """
    args = [
        "-m", model_path,
        "-c", str(plan.context_length),
        "-ngl", "999" if plan.placement != "cpu" else "0",
    ]
    if rpc_servers or (plan.tensor_split_flag and len(plan.tensor_split_flag) > 1):
        # llama.cpp lists RPC devices first, in --rpc order (src/llama.cpp, llama_prepare_model_devices): a pool's
        # workers, then on a lab host the stand-ins of the head's own GPUs, matching the pool plan's device order.
        rpc = [*rpc_servers, *lab_gpu_devices(plan, settings)]
        if rpc:
            args += ["--rpc", ",".join(rpc)]
        if plan.tensor_split_flag:
            args += ["--tensor-split", _ts(plan.tensor_split_flag), "--split-mode", "layer"]
    args += ["-fa", "on" if plan.flash_attention else "off"]
    args += ["--cache-type-k", plan.kv_cache_type, "--cache-type-v", plan.kv_cache_type]
    args += ["--parallel", "1"]
    args += ["--host", settings.bind_address, "--port", str(settings.port_for("llama.cpp"))]
    if plan.ollama_tag:
        # OpenAI clients list /v1/models: the same name as on Ollama hosts, not the GGUF's path.
        args += ["--alias", plan.ollama_tag]
    # Log level 4 prints each device's model, KV and compute buffers at load (verify reads them to
    # check the split); it logs request timings, never prompt text (tests/lab/test_deploy.py).
    args += ["--metrics", "--jinja", "--log-verbosity", "4"]
    if is_reasoning_model(plan):
        args += ["--reasoning-format", "deepseek"]
    if api_key_path:
        args += ["--api-key-file", api_key_path]
    return args


def llama_server_problems(readiness: Mapping[str, Any], install: LlamaInstall, plan: HostPlan) -> list[str]:
    """Why this host's llama-server must not be started: a binary without the flags r1fleet passes, or
    one that does not see the planned GPUs (it would run on the CPU)."""
    if readiness.get("missing_binary"):
        return [f"{install.binary} is missing from the unpacked archive (has its layout changed?)"]
    problems = []
    if readiness.get("missing_flags"):
        problems.append(f"{install.binary} lacks {', '.join(readiness['missing_flags'])} (see --help)")
    devices = readiness.get("devices") or []
    wanted = len(plan.gpu_uuids) if uses_gpu(plan) else 0
    if len(devices) < wanted:
        problems.append(
            f"{install.binary} --list-devices shows {', '.join(devices) or 'no GPU'}, the plan needs {wanted}: "
            "check the driver (nvidia-smi) and the backend library"
        )
    return problems


def llama_environment(plan: HostPlan, install: LlamaInstall | None = None) -> dict[str, str]:
    env = {"HOME": "/var/lib/llama", **dict(install.environment if install else ())}
    if plan.placement == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    elif plan.vendor == "nvidia" and plan.gpu_uuids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(plan.gpu_uuids)
        if len(plan.gpu_uuids) > 1:
            # research/placement.md section 2: recommended for multi-GPU pipeline parallelism
            env["CUDA_SCALE_LAUNCH_QUEUES"] = "4x"
    return env


# ---------------------------------------------------------------------------------------------
# llama.cpp install method


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
    if plan.placement != "cpu" and plan.vendor == "nvidia":
        archs = cuda_architectures(plan.compute_caps) or "native"
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
    elif plan.placement != "cpu" and plan.vendor == "amd":
        flags += ["-DGGML_HIP=ON"]
    elif plan.placement != "cpu" and plan.vendor == "intel":
        flags += ["-DGGML_VULKAN=ON"]
    return tuple(flags)


def bundle_backend(platform: Platform, plan: HostPlan, bundle: Mapping[str, Any]) -> str | None:
    """The GPU backend library (relative to lib/ollama) the plan needs; None on the CPU."""
    if not uses_gpu(plan):
        return None
    if plan.vendor == "nvidia" and platform.tegra_major in bundle["jetson_backends"]:
        return bundle["jetson_backends"][platform.tegra_major]
    return bundle["backends"].get(plan.vendor or "")


def llama_cpp_install(
    platform: Platform,
    plan: HostPlan,
    settings: HostConfig,
    available: set[str],
    versions: Mapping[str, Any] | None = None,
) -> LlamaInstall:
    """The distro package where it ships llama-server with the plan's GPU backend (Debian forky/sid),
    else the llama-server inside the pinned Ollama archive; a source build only when asked for.

    `available` = package names the host's apt can install. A lab host (settings.profile set)
    only simulates its GPUs, so the CPU package is what can really run there.
    """
    versions = versions or load_versions()
    pins = versions["llama_cpp"]
    debian = pins["debian"]
    gpu = uses_gpu(plan)
    backend_pkg = debian["backend_packages"].get(plan.vendor) if gpu else None
    package_distro = platform.distro_id == "debian" and platform.codename in debian["codenames"]
    server_ok = debian["server_package"] in available
    wants = settings.llama_cpp_install
    simulated = settings.profile is not None
    if wants == "package" or (wants == "auto" and package_distro and server_ok):
        packages = [debian["server_package"]]
        if backend_pkg and backend_pkg in available:
            packages.append(backend_pkg)
        if wants == "package" or simulated or not gpu or backend_pkg in available:
            return LlamaInstall(method="package", packages=tuple(packages), binary=debian["server_binary"])
    if wants == "source":
        tag = pins["tag"]
        return LlamaInstall(
            method="source",
            packages=("build-essential", "cmake", "curl", "ca-certificates"),
            binary=f"{LLAMA_ROOT}/{tag}/bin/llama-server",
            tag=tag,
            cmake_flags=cmake_flags(plan, tag),
        )
    bundle = pins["ollama_bundle"]
    release = ollama_release(plan.host, platform, plan, settings.ollama_release, versions)
    libraries = f"{release.install_dir}/{bundle['library_dir']}"
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
        binary=f"{release.install_dir}/{bundle['server']}",
        tag=bundle["llama_cpp_build"],
        release=release,
        environment=tuple(sorted(environment.items())),
        required_flags=tuple(bundle["required_flags"]),
    )
