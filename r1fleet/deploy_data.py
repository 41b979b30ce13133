"""Pure helpers for the deploy: HostPlan + host settings -> what the roles write.

Nothing here touches a host. roles/*.py call these functions and turn their results into
pyinfra operations, so every decision (which archive, which flags, which devices) is unit
tested without SSH.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from r1fleet.config import HostConfig, OllamaReleaseOverride
from r1fleet.errors import R1FleetError
from r1fleet.memory import MIB, constants
from r1fleet.models import Hardware, HostPlan
from r1fleet.net import host_port

VERSIONS_FILE = Path(__file__).with_name("versions.yaml")

OLLAMA_UNIT = "r1fleet-ollama.service"
LLAMA_UNIT = "r1fleet-llama-server.service"
UNIT_DIR = "/etc/systemd/system"
OLLAMA_ROOT = "/opt/r1fleet/ollama"
LLAMA_ROOT = "/opt/r1fleet/llama.cpp"
# systemd loads the API key as a credential: the file stays root-only on disk and the
# service reads it from its private credentials directory (%d); the key never enters argv.
API_KEY_CREDENTIAL = "api-key"


class DeployError(R1FleetError):
    """A host cannot be deployed as planned (missing sha256, unsupported arch, ...)."""


# ---------------------------------------------------------------------------------------------
# What a plan needs from the host


def uses_gpu(plan: HostPlan) -> bool:
    """The plan runs on a GPU (discrete or unified): device access, groups, no W^X lock."""
    return plan.placement != "cpu" and plan.vendor is not None


# ---------------------------------------------------------------------------------------------
# Platform (what the roles need from the probe's Hardware)


@dataclass(frozen=True)
class Platform:
    arch: str  # Ollama/Debian naming: amd64 | arm64
    distro_id: str
    codename: str
    tegra_major: int | None  # 35 (JetPack 5) or 36 (JetPack 6) on Jetson


_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def platform_from_hardware(hw: Hardware) -> Platform:
    arch = _ARCH.get(hw.os.arch.lower())
    if arch is None:
        raise DeployError(
            f"architecture {hw.os.arch!r} is not supported (Ollama and llama.cpp builds exist for x86_64 and aarch64)",
            host=hw.host,
            field="uname",
            fix="deploy to an x86_64 or aarch64 host",
        )
    tegra = None
    if hw.tegra_release:
        match = re.search(r"R(\d+)", hw.tegra_release)
        tegra = int(match.group(1)) if match else None
    return Platform(arch=arch, distro_id=hw.os.id.lower(), codename=hw.os.codename.lower(), tegra_major=tegra)


# ---------------------------------------------------------------------------------------------
# Versions


@lru_cache(maxsize=4)
def load_versions(path: str | None = None) -> dict[str, Any]:
    return yaml.safe_load(Path(path or VERSIONS_FILE).read_text())


@dataclass(frozen=True)
class Asset:
    name: str
    url: str
    sha256: str


@dataclass(frozen=True)
class OllamaRelease:
    version: str
    assets: tuple[Asset, ...]

    @property
    def install_dir(self) -> str:
        return f"{OLLAMA_ROOT}/{self.version}"

    @property
    def binary(self) -> str:
        return f"{self.install_dir}/bin/ollama"

    @property
    def needs_zstd(self) -> bool:
        return any(a.name.endswith(".tar.zst") for a in self.assets)

    @property
    def stamp(self) -> str:
        """A marker file name that changes when any archive changes (so a re-pin reinstalls)."""
        import hashlib

        digest = hashlib.sha256("".join(a.sha256 for a in self.assets).encode()).hexdigest()[:16]
        return f"{self.install_dir}/.r1fleet-installed-{digest}"


def ollama_asset_stems(platform: Platform, vendor: str | None, placement: str | None) -> list[str]:
    """Archive names without extension: the base archive plus the add-on the GPU needs."""
    base = f"ollama-linux-{platform.arch}"
    stems = [base]
    if placement != "cpu" and vendor == "amd" and platform.arch == "amd64":
        stems.append(f"{base}-rocm")
    if platform.arch == "arm64" and platform.tegra_major in (35, 36):
        stems.append(f"{base}-jetpack{5 if platform.tegra_major == 35 else 6}")
    return stems


def parse_sha256sums(text: str) -> dict[str, str]:
    """`sha256sum` output ("<hex>  name" or "<hex> *name") -> {name: hex}; './' prefixes dropped."""
    sums: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split()
        if len(parts) == 2 and re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
            sums[parts[1].lstrip("*").removeprefix("./")] = parts[0].lower()
    return sums


def ollama_release(
    host: str,
    platform: Platform,
    plan: HostPlan,
    override: OllamaReleaseOverride | None = None,
    versions: Mapping[str, Any] | None = None,
) -> OllamaRelease:
    """Pick the archives for this host and their sha256 (override first, then versions.yaml).

    For each stem, the zstd archive is preferred when its sha256 is known; the .tgz is the
    fallback (pre-0.14 releases, and the lab's stand-in), as install.sh does.
    """
    pinned = (versions or load_versions())["ollama"]
    override = override or OllamaReleaseOverride()
    version = override.version or pinned["version"]
    base_url = (override.base_url or pinned["base_url"]).format(version=version).rstrip("/")
    # The pinned sums hold for the pinned version only; host data may add the ones it lacks (a JetPack add-on).
    known = dict(pinned.get("sha256") or {}) if version == pinned["version"] else {}
    known.update(override.sha256)
    assets = []
    for stem in ollama_asset_stems(platform, plan.vendor, plan.placement):
        for name in (f"{stem}.tar.zst", f"{stem}.tgz"):
            if known.get(name):
                assets.append(Asset(name=name, url=f"{base_url}/{name}", sha256=known[name].lower()))
                break
        else:
            raise DeployError(
                f"no sha256 is pinned for {stem}.tar.zst (Ollama {version})",
                host=host,
                field="ollama.sha256",
                fix="add its line from the release's sha256sum.txt to r1fleet/versions.yaml or host data ollama_release.sha256",
            )
    return OllamaRelease(version=version, assets=tuple(assets))


# ---------------------------------------------------------------------------------------------
# Service settings


def ollama_environment(plan: HostPlan, settings: HostConfig, models_dir: str) -> dict[str, str]:
    """The Environment= lines of the Ollama unit (research/ollama.md section 2)."""
    env = {
        "OLLAMA_HOST": host_port(settings.bind_address, settings.port_for("ollama")),
        "OLLAMA_MODELS": models_dir,
        "OLLAMA_CONTEXT_LENGTH": str(plan.context_length),
        "OLLAMA_KV_CACHE_TYPE": plan.kv_cache_type,
        # Negative = keep the planned model loaded forever: the host serves one model.
        "OLLAMA_KEEP_ALIVE": "-1",
        # Context memory is num_ctx x parallel; the plan budgeted one slot.
        "OLLAMA_NUM_PARALLEL": "1",
        "OLLAMA_MAX_LOADED_MODELS": "1",
        "HOME": "/var/lib/ollama",
    }
    if plan.flash_attention_forced or plan.kv_cache_type != "f16":
        # Otherwise Ollama decides per GPU (ml/device.go), as the plan already assumed; a quantized KV
        # cache needs it on.
        env["OLLAMA_FLASH_ATTENTION"] = "1" if plan.flash_attention else "0"
    if plan.placement != "cpu" and plan.devices:
        # Ollama >= 0.30 runs llama-server, whose --fit would push layers to the CPU when less than its
        # margin (default 1024 MiB) stays free; make its margin the plan's headroom (research/ollama.md s2).
        env["LLAMA_ARG_FIT_TARGET"] = str(plan.devices[0].headroom_mib)
    if plan.placement == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"  # docs/gpu.mdx: -1 forces the CPU
    elif plan.vendor == "nvidia" and plan.gpu_uuids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(plan.gpu_uuids)
        lab_devices = lab_gpu_devices(plan, settings)
        if lab_devices:
            # Lab hosts only: each simulated GPU is a llama.cpp RPC device; the stand-in Ollama gives its runner
            # the ones CUDA_VISIBLE_DEVICES names, as CUDA would show it only those (tests/standins/ollama).
            env["R1FLEET_LAB_GPU_RPC"] = ",".join(f"{u}={d}" for u, d in zip(plan.gpu_uuids, lab_devices))
    return env


def _ts(values: list[int]) -> str:
    return ",".join(str(v) for v in values)


def is_reasoning_model(plan: HostPlan) -> bool:
    from r1fleet.catalog import load_catalog

    return bool(plan.model) and load_catalog().find(plan.model).reasoning


def llama_server_args(plan: HostPlan, settings: HostConfig, model_path: str, api_key_path: str | None) -> list[str]:
    """llama-server arguments for the plan (research/placement.md section 1).

    api_key_path is where the service reads the key (the credentials directory), never the key.
    """
    args = [
        "-m", model_path,
        "-c", str(plan.context_length),
        "-ngl", "999" if plan.placement != "cpu" else "0",
    ]
    if plan.tensor_split_flag and len(plan.tensor_split_flag) > 1:
        rpc = lab_gpu_devices(plan, settings)
        if rpc:
            args += ["--rpc", ",".join(rpc)]
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


def lab_gpu_devices(plan: HostPlan, settings: HostConfig) -> list[str]:
    """On a lab host (simulated GPUs), the llama.cpp RPC devices that stand in for the planned GPUs.

    The lab runs one ggml-rpc-server per simulated GPU (r1fleet/lab/image.py); real hosts: none.
    """
    if settings.profile is None or not uses_gpu(plan):
        return []
    from r1fleet.lab.paths import GPU_RPC_BASE_PORT

    return [f"127.0.0.1:{GPU_RPC_BASE_PORT + index}" for index in plan.gpu_indices]


def ollama_load_at_start(tag: str, api: str, timeout_s: int) -> list[str]:
    """The Ollama unit's ExecStartPost=: load the planned model as soon as the server answers, so every start
    (boot, restart, crash) ends with it loaded. Ollama loads nothing by itself at start (server/routes.go
    Serve); an empty /api/generate loads the model and answers done_reason "load" (routes.go:471-491).

    It retries only while the server does not accept connections yet (curl exit 7); an HTTP error (the
    model not pulled yet, on a first deploy) ends it at once. `timeout` bounds the whole of it below the
    unit's TimeoutStartSec (LOAD_AT_START_SLACK_S more), and a failure does not fail the service (`-`)."""
    script = f"while :; do {ollama_load_request(tag, api)}; [ $? -eq 7 ] || exit 0; sleep 1; done"
    return ["-/usr/bin/timeout", str(timeout_s), "/bin/sh", "-c", script]


def ollama_load_request(tag: str, api: str) -> str:
    """The shell command that loads `tag` and keeps it loaded: an empty /api/generate with keep_alive -1."""
    body = json.dumps({"model": tag, "keep_alive": -1}, separators=(",", ":"))
    return (f"curl -sf -o /dev/null -X POST -H 'Content-Type: application/json' -d {shlex.quote(body)} "
            f"{shlex.quote(api + '/api/generate')}")


def ollama_load_check(tag: str, api: str) -> str:
    """macOS has no ExecStartPost: a LaunchDaemon runs this at boot and every LOAD_CHECK_INTERVAL_S, loading
    the planned model whenever the server answers without it loaded (after a restart or a crash)."""
    return (f"curl -sf --max-time 10 {shlex.quote(api + '/api/ps')} | grep -qF {shlex.quote(json.dumps(tag))} "
            f"|| {ollama_load_request(tag, api)}")


LOAD_CHECK_INTERVAL_S = 30


LOAD_AT_START_SLACK_S = 30  # TimeoutStartSec beyond the load's own bound: systemd never kills a slow load


def health_timeout_s(plan: HostPlan) -> int:
    """How long the start-up health gate waits: a base time plus reading the model from a slow disk."""
    c = constants()
    size = plan.gguf.size_bytes if plan.gguf and plan.gguf.size_bytes else 0
    return c.health_base_s + math.ceil(size / (c.health_disk_read_mb_per_s * 1_000_000))


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


def device_allow(plan: HostPlan) -> list[str]:
    """DeviceAllow= entries: only the GPU device classes the plan uses (names from /proc/devices)."""
    if plan.placement == "cpu" or plan.vendor is None:
        return []
    if plan.vendor == "nvidia":  # CUDA opens /dev/nvidia*, never /dev/dri
        return ["char-nvidia-frontend rw", "char-nvidia-uvm rw", "char-nvidia-caps r"]
    if plan.vendor == "amd":  # by device class: a path rule is skipped when /dev/kfd appears after the start
        return ["char-kfd rw", "char-drm rw"]
    if plan.vendor == "intel":
        return ["char-drm rw"]
    return []


class UnitSpecifier(str):
    """A word r1fleet writes with a systemd specifier on purpose (`%d/api-key`): kept as it is in a unit."""


def systemd_word(value: str) -> str:
    """One ExecStart= word as systemd reads it back as `value` (systemd.service "Command lines",
    systemd.unit "Specifiers"): `%` is a specifier and `$` a variable unless doubled, and quotes,
    backslashes and whitespace end or change a word, so they are escaped inside double quotes.

    >>> systemd_word("/models/a b%1.gguf")
    '"/models/a b%%1.gguf"'
    """
    if isinstance(value, UnitSpecifier):
        return str(value)
    escaped = _quoted_text(value).replace("$", "$$")
    plain = escaped == value and value and not any(c.isspace() or c in "'\\;" for c in value)
    return value if plain else f'"{escaped}"'


def systemd_environment(key: str, value: str) -> str:
    """The text between the quotes of `Environment="KEY=VALUE"` that systemd reads back as exactly that
    one assignment (a `"` in a value would otherwise end it and start another, audit L3)."""
    return f"{key}={_quoted_text(value)}"


def _quoted_text(value: str) -> str:
    return (value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
            .replace("\n", "\\n").replace("\t", "\\t"))


def unit_context(
    plan: HostPlan,
    settings: HostConfig,
    *,
    description: str,
    user: str,
    exec_start: list[str],
    environment: dict[str, str],
    read_write_paths: list[str],
    read_only_paths: list[str] = (),
    restrict_ip: bool,
    credential: str | None = None,
    exec_start_post: list[str] = (),
    timeout_start_s: int | None = None,
) -> dict[str, Any]:
    """Template variables for templates/systemd/r1fleet-service.j2."""
    gpu = uses_gpu(plan)
    ip_allow: list[str] = []
    if restrict_ip:
        ip_allow = ["localhost"]
        if not settings.local_only:
            # The deploy's health check and verify's on-host requests come from the host's own LAN address.
            own = [] if settings.listen in ("0.0.0.0", "::") else [settings.listen]
            ip_allow += [*own, *settings.allow]
    return {
        "description": description,
        "user": user,
        "exec_start": " ".join(systemd_word(word) for word in exec_start),
        "exec_start_post": " ".join(systemd_word(word) for word in exec_start_post),
        "timeout_start_s": timeout_start_s,
        "environment": [systemd_environment(key, value) for key, value in sorted(environment.items())],
        "read_write_paths": list(read_write_paths),
        "read_only_paths": list(read_only_paths),
        "device_allow": device_allow(plan),
        "gpu": gpu,
        # CUDA's driver and HIP map JIT-compiled kernels writable+executable, which
        # MemoryDenyWriteExecute forbids; it is only safe for CPU-only services.
        "memory_deny_write_execute": not gpu,
        "load_nvidia_uvm": gpu and plan.vendor == "nvidia" and plan.placement != "unified",
        "ip_allow": ip_allow,
        "restrict_ip": restrict_ip,
        "credential": credential,
    }


# ---------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelDownload:
    url: str
    file: str
    sha256: str


def model_download(host: str, plan: HostPlan, settings: HostConfig) -> ModelDownload:
    """The GGUF to fetch: from the artifact mirror in rehearsal (when set), else the catalog URL."""
    gguf = plan.gguf
    if gguf is None:
        raise DeployError("the plan has no GGUF file", host=host, field="plan.gguf", fix="pick a catalog model with a gguf entry")
    sha = (gguf.sha256 or "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise DeployError(
            f"no sha256 is known for {gguf.file}; r1fleet downloads only verified models",
            host=host,
            field="catalog gguf.sha256",
            fix="add the file's sha256 to r1fleet/catalog.yaml",
        )
    if settings.mirror and (settings.rehearsal or not gguf.url):
        url = f"{settings.mirror.rstrip('/')}/models/{gguf.file}"
    elif gguf.url:
        url = gguf.url
    else:
        fix = ("rehearsal serves the stand-in from an artifact mirror: set mirror: for this host (the lab does), or drop rehearsal"
               if settings.rehearsal else "set the catalog URL or a mirror for this host")
        raise DeployError(f"no download URL for {gguf.file}", host=host, field="catalog gguf.url", fix=fix)
    return ModelDownload(url=url, file=gguf.file, sha256=sha)


def download_mib(plan: HostPlan, hw: Hardware) -> int:
    """What the deploy will write to the model directory: nothing for a model file already there."""
    from r1fleet.catalog import load_catalog

    gguf = plan.gguf
    if gguf is None or not gguf.size_bytes:
        return 0
    size_mib = math.ceil(gguf.size_bytes / MIB)
    if plan.backend == "llama.cpp":
        return 0 if hw.model_files.get(gguf.file) == gguf.size_bytes else size_mib
    digest = load_catalog().find(plan.model).ollama_digest if plan.model else None
    if digest and f"sha256-{digest}" in hw.model_files:
        return 0
    # Ollama: a pull stores the model once; an offline import (rehearsal) keeps the GGUF and its stored copy.
    return size_mib * (2 if plan.rehearsal else 1)


def check_disk(host: str, plan: HostPlan, hw: Hardware) -> None:
    """Refuse a host whose model directory cannot take the download plus a margin, before anything changes."""
    need = download_mib(plan, hw)
    if not need or hw.disk_free_mib is None:
        return
    margin = constants().disk_margin_mib
    if hw.disk_free_mib < need + margin:
        raise DeployError(
            f"the model needs {need:,} MiB on the model directory's filesystem plus a {margin:,} MiB margin, "
            f"and {hw.disk_free_mib:,} MiB are free",
            host=host, field="model_dir", fix="free space there, or set model_dir to a directory on a larger disk",
        )


IMPORT_RECORD = "imported.json"  # in <model_dir>/import: what Ollama reported for r1fleet's import


def ollama_tag_digest(tags_document: Any, tag: str) -> str | None:
    """The digest Ollama reports for `tag` in /api/tags (the manifest's sha256, server/model_list_cache.go)."""
    models = tags_document.get("models") if isinstance(tags_document, dict) else None
    for entry in models or []:
        if isinstance(entry, dict) and tag in (entry.get("name"), entry.get("model")):
            return entry.get("digest") if isinstance(entry.get("digest"), str) else None
    return None


def import_record_digest(record: Any, tag: str, source_sha256: str | None) -> str | None:
    """The digest Ollama reported for `tag` right after r1fleet imported the file `source_sha256`, from the
    import record; None when the record is missing or is of another file. Ollama's `create` rewrites a GGUF
    through llama-quantize (server/create.go), so what it stores is known only from what it reports then.

    >>> import_record_digest({"tag": "t", "source_sha256": "ab", "tags": {"models": [{"name": "t", "digest": "cd"}]}}, "t", "ab")
    'cd'
    """
    if not isinstance(record, dict) or record.get("tag") != tag or record.get("source_sha256") != source_sha256:
        return None
    return ollama_tag_digest(record.get("tags"), tag)


def modelfile(model_path: str, plan: HostPlan) -> str:
    """The Modelfile for Ollama's offline import (`ollama create`, research/ollama.md section 7)."""
    return f"FROM {model_path}\nPARAMETER num_ctx {plan.context_length}\n"


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


# ---------------------------------------------------------------------------------------------
# Printing


def format_plan(plan: HostPlan, rehearsal: bool) -> str:
    """One readable block per host, printed by deploy.py before anything changes."""
    if not plan.fits or not plan.backend:
        why = "; ".join(plan.reasons) or "no model fits"
        return f"[{plan.host}] plan: nothing to deploy ({why})"
    lines = [
        f"[{plan.host}] plan: {plan.model} via {plan.backend} ({plan.placement})"
        + ("  [rehearsal: stand-in model]" if rehearsal else ""),
        f"[{plan.host}]   tag={plan.ollama_tag} context={plan.context_length} kv={plan.kv_cache_type} "
        f"flash_attention={'on' if plan.flash_attention else 'off'}"
        + (f" blocks_per_gpu={_ts(plan.tensor_split)} --tensor-split {_ts(plan.tensor_split_flag)}" if plan.tensor_split_flag else "")
        + (f" gpus={','.join(plan.gpu_uuids)}" if plan.gpu_uuids else ""),
    ]
    if plan.reasons:
        lines.append(f"[{plan.host}]   why: {plan.reasons[0]}")
    return "\n".join(lines)
