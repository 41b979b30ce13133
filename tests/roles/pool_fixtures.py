"""A pooled plan of two single-RTX 3090 hosts (box-b the worker, box-a the head) and their settings, for the
pool deploy's role tests; the numbers are the shape r1fleet/plan/pools.py gives (tests/unit/test_pools.py)."""

from __future__ import annotations

from r1fleet.fleet.config import HostConfig
from r1fleet.records import GgufFile, Gpu, Hardware, OsInfo, PoolDevice, PoolPlan
from r1fleet.artifacts.pins import Platform

SHA = "d" * 64
FORKY = Platform(arch="amd64", distro_id="debian", codename="forky", tegra_major=None)
SID_CUDA = {"llama.cpp-tools", "libggml0-backend-cuda", "llama.cpp-tools-extra", "libggml0-backend-rpc"}
HEAD_ADDRESS, WORKER_ADDRESS = "192.168.1.31", "192.168.1.32"
RPC_SERVER = "/usr/libexec/x86_64-linux-gnu/llama/bin/ggml-rpc-server"


def device(host: str, uuid: str, layers: int, rpc: bool, index: int = 0, output: bool = False) -> PoolDevice:
    return PoolDevice(device=f"GPU{index} NVIDIA GeForce RTX 3090", capacity_mib=23975, planned_mib=23600,
                      weights_mib=20000, kv_cache_mib=2500, compute_mib=500, overhead_mib=600, layers=layers,
                      host=host, rpc=rpc, gpu_index=index, gpu_uuid=uuid, output=output)


def pool_plan(**overrides) -> PoolPlan:
    base = dict(
        pool="big", head="box-a", workers=["box-b"], pooled=True, model="deepseek-r1-distill-llama-70b",
        ollama_tag="deepseek-r1:70b-llama-distill-q4_K_M", backend="llama.cpp", context_length=14336,
        kv_cache_type="f16", flash_attention=True, tensor_split=[41, 39],
        devices=[device("box-b", "GPU-bbbb", 41, True), device("box-a", "GPU-aaaa", 39, False, output=True)],
        est_tokens_per_second=16.9, network_gbps=1.0, rpc_port=50052, n_layers=80,
        gguf=GgufFile(url="https://example.invalid/70b.gguf", file="70b.gguf", size_bytes=42_520_395_584, sha256=SHA),
    )
    base.update(overrides)
    return PoolPlan(**base)


def hardware(host: str, uuid: str) -> Hardware:
    gpu = Gpu(index=0, vendor="nvidia", name="NVIDIA GeForce RTX 3090", memory_total_mib=24576, uuid=uuid,
              compute_cap="8.6", source="nvidia-smi-query")
    return Hardware(host=host, ram_total_mib=65536, gpus=[gpu], os=OsInfo(arch="x86_64", id="debian", codename="forky"))


def head_config(**settings) -> HostConfig:
    return HostConfig(**{"name": "box-a", "address": HEAD_ADDRESS, **settings})


def worker_config(**settings) -> HostConfig:
    return HostConfig(**{"name": "box-b", "address": WORKER_ADDRESS, **settings})
