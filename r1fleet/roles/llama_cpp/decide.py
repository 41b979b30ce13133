"""The llama.cpp role's decisions, made without a host: where llama-server comes from, its arguments and
environment, and what makes a host's llama-server unfit to start."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from r1fleet.fleet.config import HostConfig
from r1fleet.records import HostPlan
from r1fleet.tensor_split import format_flag
from r1fleet.fleet import plugins
from r1fleet.artifacts.llama_cpp_install import LlamaInstall
from r1fleet.plan.catalog import load_catalog

USER = "llama"  # the service user
HOME = "/var/lib/llama"


def llama_models_dir(settings: HostConfig) -> str:
    """Where the llama.cpp role keeps its GGUF, owned by its user: <model_dir>/llama.cpp."""
    return f"{settings.model_dir.rstrip('/')}/llama.cpp"


# systemd loads the API key as a credential: the file stays root-only on disk and the
# service reads it from its private credentials directory (%d); the key never enters argv.
API_KEY_CREDENTIAL = "api-key"


def is_reasoning_model(plan: HostPlan) -> bool:
    return bool(plan.model) and load_catalog().find(plan.model).reasoning


def llama_server_args(plan: HostPlan, settings: HostConfig, model_path: str, api_key_path: str | None,
                      rpc_servers: Sequence[str] = ()) -> list[str]:
    """llama-server arguments for the plan (docs/research/placement.md section 1).

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
        rpc = [*rpc_servers, *plugins.gpu_devices(plan, settings)]
        if rpc:
            args += ["--rpc", ",".join(rpc)]
        if plan.tensor_split_flag:
            args += ["--tensor-split", format_flag(plan.tensor_split_flag), "--split-mode", "layer"]
    args += ["-fa", "on" if plan.flash_attention else "off"]
    args += ["--cache-type-k", plan.kv_cache_type, "--cache-type-v", plan.kv_cache_type]
    args += ["--parallel", "1"]
    if plan.cache_ram_mib is not None:
        # The prompt cache in host RAM, sized by the plan (llama.cpp's default is 8192 MiB whatever the host has).
        args += ["--cache-ram", str(plan.cache_ram_mib)]
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
    wanted = planned_gpus(plan)
    if len(devices) < wanted:
        problems.append(
            f"{install.binary} --list-devices shows {', '.join(devices) or 'no GPU'}, the plan needs {wanted}: "
            "check the driver (nvidia-smi) and the backend library"
        )
    return problems


def planned_gpus(plan: HostPlan) -> int:
    """How many GPUs of this host the plan runs on: by UUID where the probe had them, else by index."""
    return max(len(plan.gpu_uuids), len(plan.gpu_indices)) if plan.uses_gpu else 0


def llama_environment(plan: HostPlan, install: LlamaInstall | None = None) -> dict[str, str]:
    """The unit's environment: the GPU selection, in the plan's order, and the install's library paths."""
    env = {"HOME": "/var/lib/llama", **dict(install.environment if install else ())}
    if plan.placement == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    elif plan.vendor == "nvidia" and plan.gpu_uuids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(plan.gpu_uuids)  # CUDA numbers the listed devices in this order
    elif plan.vendor == "nvidia" and plan.gpu_indices:
        # No UUID in the probe (the driver came later): by index in nvidia-smi's order, which is the PCI bus
        # order; CUDA's own default is fastest first (CUDA_DEVICE_ORDER=FASTEST_FIRST, CUDA C Programming Guide,
        # "CUDA Environment Variables"), which would put a mixed split's shares on the wrong cards.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in plan.gpu_indices)
    if plan.vendor == "nvidia" and planned_gpus(plan) > 1:
        # docs/research/placement.md section 2: recommended for multi-GPU pipeline parallelism
        env["CUDA_SCALE_LAUNCH_QUEUES"] = "4x"
    return env
