"""Typed values that flow along the spine: Hardware (from a probe) and HostPlan (from the planner).

These are the contracts between stages; `HostPlan.model_dump()` is what `r1fleet plan --json`
prints for each host and what the roles and the verification suite read.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator

from r1fleet.tensor_split import flag_for_layers

# r1fleet's own directories on a host: what it installs, its configuration, and what it keeps (its models, unless the fleet file
# names another `model_dir`, and its own bookkeeping). A removal takes them away (r1fleet/deploy/remove.py).
INSTALL_ROOT = "/opt/r1fleet"
CONFIG_DIR = "/etc/r1fleet"
STATE_DIR = "/var/lib/r1fleet"
DEFAULT_MODEL_DIR = f"{STATE_DIR}/models"

Vendor = Literal["nvidia", "amd", "intel", "apple"]
GpuSource = Literal["nvidia-smi-query", "nvidia-smi", "lspci", "rocm-smi", "drm"]
UnifiedKind = Literal["apple", "gb10", "jetson", "amd-apu"]
Backend = Literal["ollama", "llama.cpp"]
Placement = Literal["gpu", "multi-gpu", "unified", "cpu"]
KvType = Literal["f16", "q8_0", "q4_0"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GpuProcess(_Strict):
    """A compute process on a GPU, from `nvidia-smi --query-compute-apps`."""

    pid: int
    name: str
    used_mib: int
    own: bool = Field(False, description="a process of r1fleet's own service (its memory counts as free)")


class Gpu(_Strict):
    """One discrete GPU as the probe saw it."""

    index: int
    vendor: Vendor
    name: str
    memory_total_mib: int
    memory_used_mib: int | None = None
    memory_free_mib: int | None = None
    uuid: str | None = None
    bus_id: str | None = None
    pci_id: str | None = Field(None, description="vendor:device, e.g. 10de:2204")
    driver_version: str | None = None
    compute_cap: str | None = None
    bandwidth_gbps: float | None = None
    source: GpuSource
    processes: list[GpuProcess] = []
    mig: bool = False
    kernel_driver: str | None = Field(None, description="the driver bound to it (lspci -k: nvidia, nouveau, amdgpu, vfio-pci)")
    gfx_target: str | None = Field(None, description="AMD: the LLVM target ROCm builds for, e.g. gfx1100")


class UnifiedMemory(_Strict):
    """Memory shared by CPU and GPU (Apple Silicon, DGX Spark, Jetson, Strix Halo)."""

    kind: UnifiedKind
    name: str
    total_mib: int
    gpu_limit_mib: int = Field(description="what the GPU may use: working-set limit or GTT size")
    gpu_limit_raisable: bool = Field(False, description="Apple's default working set, which r1fleet may raise at boot")
    available_mib: int | None = None
    bandwidth_gbps: float | None = None


class OsInfo(_Strict):
    system: str = "Linux"
    kernel: str = ""
    arch: str = ""
    id: str = ""
    version_id: str = ""
    codename: str = ""
    pretty_name: str = ""
    init: str = ""  # "systemd", else PID 1's name; "" unknown (an older probe document, macOS)


class DiskSpace(_Strict):
    """One filesystem the deploy writes to, from `df -Pk` of a folder (or of its nearest existing parent)."""

    mount: str  # where the filesystem is mounted (df's last column): two folders on one mount share its space
    free_mib: int


class DriverFacts(_Strict):
    """What the host says about its GPU driver beyond nvidia-smi: the module on disk and in memory, who owns the
    CUDA library, the kernel packages it has and can get. Empty on an older probe document (nothing known)."""

    nvidia_smi_error: str | None = Field(None, description="nvidia-smi's own words when it fails, e.g. the NVML mismatch")
    nvidia_loaded: str | None = Field(None, description="the version of the module in memory (/proc/driver/nvidia/version)")
    nvidia_module: str | None = Field(None, description="the version of the module for the running kernel (modinfo)")
    libcuda_packages: list[str] = Field([], description="the packages that own libcuda.so.1 (dpkg -S, rpm -qf)")
    cuda_repo: bool = Field(False, description="NVIDIA's CUDA repository is in the host's apt sources")
    run_installer: bool = Field(False, description="nvidia-uninstall is present: a driver from NVIDIA's .run installer")
    kernel_packages: list[str] | None = Field(None, description="installed kernel packages (dpkg-query, rpm); None: not asked")
    apt_offers: list[str] | None = Field(None, description="kernel-specific packages apt offers for the running kernel; None: not asked")
    dkms_status: list[str] = Field([], description="`dkms status` lines")
    reboot_marker: str | None = Field(None, description="r1fleet's record of a reboot for a driver: 'version boot-id'")
    boot_id: str | None = None


class PackageVersions(_Strict):
    """A distribution package as apt sees it on the host: the version installed and the one apt would install."""

    installed: str | None = None
    candidate: str | None = None


# The Debian source packages a pool's llama.cpp comes from (ggml: the backends and the RPC protocol; llama.cpp: the
# servers), and Debian's version syntax (Debian Policy 5.6.12: [epoch:]upstream[-revision], upstream from a digit).
LLAMA_CPP_SOURCES = ("ggml", "llama.cpp")
_DEBIAN_VERSION = re.compile(r"(?:[0-9]+:)?[0-9][A-Za-z0-9.+~-]*")


def is_debian_version(text: str) -> bool:
    return len(text) <= 100 and _DEBIAN_VERSION.fullmatch(text) is not None


class LlamaCppApt(_Strict):
    """What the probe read of apt's llama.cpp packages (without fetching its lists): whether the lists were ever
    fetched, and per package the version installed and the one apt would install."""

    lists: bool = Field(False, description="apt's package lists are on the host (else only installed packages are known)")
    installed: dict[str, str] = {}
    candidates: dict[str, str] = {}


class Hardware(_Strict):
    """Everything the planner needs to know about one host, parsed from its probe document."""

    host: str
    os: OsInfo = OsInfo()
    ram_total_mib: int
    ram_available_mib: int | None = None
    cpu_count: int = 1
    cpu_name: str = ""
    avx2: bool = False
    avx512: bool = False
    gpus: list[Gpu] = []
    unified: UnifiedMemory | None = None
    disk_free_mib: int | None = None
    model_mount: str | None = None  # where the model directory's filesystem is mounted (disk_free_mib: its free space)
    install_disk: DiskSpace | None = None  # the filesystem of INSTALL_ROOT, where the releases are unpacked
    installed_releases: list[str] = Field([], description="the Ollama releases' install stamps under INSTALL_ROOT")
    model_files: dict[str, int] = Field({}, description="files over 100 MiB already in the model directory: name -> bytes")
    secure_boot: bool | None = None
    tegra_release: str | None = None
    driver: DriverFacts = DriverFacts()
    haproxy: PackageVersions | None = Field(None, description="the distribution's haproxy package (apt hosts)")


    llama_cpp_apt: LlamaCppApt | None = Field(None, description="apt's llama.cpp packages (Debian); None without apt")
    notes: list[str] = []


class DevicePlan(_Strict):
    """Planned memory on one device (a GPU, the unified pool, or system RAM)."""

    device: str
    capacity_mib: int
    planned_mib: int
    weights_mib: int
    kv_cache_mib: int
    compute_mib: int
    overhead_mib: int
    headroom_mib: int = 0
    layers: int = 0


class GgufFile(_Strict):
    url: str
    file: str
    size_bytes: int | None = None
    sha256: str | None = None


class HostPlan(_Strict):
    """The planner's decision for one host (the `r1fleet plan --json` contract)."""

    host: str
    model: str | None
    ollama_tag: str | None = None
    backend: Backend | None = None
    placement: Placement | None = None
    fits: bool = False
    context_length: int = 0
    kv_cache_type: KvType = "f16"
    flash_attention: bool = True
    ubatch: int = Field(512, description="the micro-batch the runtime runs (Ollama picks it itself: -b/-ub)")
    flash_attention_forced: bool = Field(
        False, description="the deploy must set flash attention explicitly (policy, or a quantized KV cache needs it)"
    )
    tensor_split: list[int] | None = Field(None, description="blocks per GPU; the last GPU also holds the output layer")
    gpus: list[dict] = []
    gpu_uuids: list[str] = []
    gpu_indices: list[int] = Field([], description="the planned GPUs' indices, in tensor-split order")
    unified_memory_mib: int | None = None
    devices: list[DevicePlan] = []
    est_tokens_per_second: float | None = None
    reasons: list[str] = []
    gguf: GgufFile | None = None
    n_layers: int | None = None
    compute_caps: list[str] = []
    vendor: Vendor | None = None
    rehearsal: bool = False
    target_model: str | None = Field(None, description="in rehearsal: the model the plan is for (a stand-in is served)")
    disk_needed_mib: int | None = None
    cache_ram_mib: int | None = Field(
        None, description="llama-server --cache-ram: its prompt cache's cap in host RAM in MiB (0: off); None: no llama-server"
    )

    @property
    def uses_gpu(self) -> bool:
        """The plan runs on a GPU (discrete or unified): device access, groups, no W^X lock."""
        return self.placement != "cpu" and self.vendor is not None

    @computed_field(description="llama-server --tensor-split that places exactly tensor_split (r1fleet/tensor_split.py)")
    @property
    def tensor_split_flag(self) -> list[int] | None:
        return flag_for_layers(self.tensor_split) if self.tensor_split and len(self.tensor_split) > 1 else None


class PoolDevice(DevicePlan):
    """One device of a pool, listed in llama.cpp's device order: the workers' GPUs (RPC devices, in --rpc order,
    each worker's in index order) first, then the head's own GPUs (src/llama.cpp puts RPC devices first)."""

    host: str
    rpc: bool = Field(description="served by the host's rpc-server (a worker); False: one of the head's own GPUs")
    gpu_index: int
    gpu_uuid: str | None = None
    output: bool = Field(False, description="holds the output layer (the last device, one of the head's GPUs)")


class PoolPlan(_Strict):
    """The planner's decision for a pool: one model across its hosts (pooled), or its members kept separate."""

    pool: str
    head: str
    workers: list[str] = Field(description="the worker hosts, in llama-server --rpc order")
    pooled: bool = Field(False, description="True: the pool serves the model; False: each member keeps its own plan")
    model: str | None = None
    ollama_tag: str | None = Field(None, description="llama-server --alias, as on a single host")
    backend: Backend | None = None
    context_length: int = 0
    kv_cache_type: KvType = "f16"
    flash_attention: bool = True
    tensor_split: list[int] | None = Field(None, description="blocks per device, in `devices` order; the last also holds the output")
    devices: list[PoolDevice] = []
    est_tokens_per_second: float | None = Field(None, description="with the network's cost per token")
    est_tokens_per_second_one_host: float | None = Field(None, description="the same split as if all devices were on one host")
    network_ms_per_token: float | None = None
    network_gbps: float
    rpc_port: int = Field(description="the workers' rpc-server port")
    gguf: GgufFile | None = None
    n_layers: int | None = None
    reasons: list[str] = []
    llama_cpp_versions: dict[str, str] = Field(
        {}, description="the Debian versions every member runs, by source package (ggml, llama.cpp): recorded by "
                        "`r1fleet lock` from what the members have installed, then installed and checked before each start")

    @field_validator("llama_cpp_versions")
    @classmethod
    def _debian_versions(cls, value: dict[str, str]) -> dict[str, str]:
        # written into apt's command line and the units' start checks: a Debian version and nothing else
        for source, version in value.items():
            if source not in LLAMA_CPP_SOURCES:
                raise ValueError(f"{source!r} is not one of {', '.join(LLAMA_CPP_SOURCES)}")
            if not is_debian_version(version):
                raise ValueError(f"{version!r} is not a Debian package version")
        return value

    @computed_field(description="llama-server --tensor-split over local and RPC devices in llama.cpp's order (r1fleet/tensor_split.py)")
    @property
    def tensor_split_flag(self) -> list[int] | None:
        return flag_for_layers(self.tensor_split) if self.tensor_split else None
