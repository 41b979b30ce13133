"""Ask the real llama.cpp how much memory a model takes on each device, without its weights.

On a lab host, a shape-only GGUF of the catalog model (shape_gguf.py: real metadata and tensor
types, the data a sparse hole) is loaded by Debian's real llama-server over llama.cpp RPC devices
(ggml-rpc-server, one per device). Before loading, llama-server's `--fit` pre-pass does a dry run with
the server's own context parameters and prints each device's model, context (KV) and compute buffers
(`common_memory_breakdown_print`). The rpc-servers run under an address-space cap, so the real load
that follows fails at once instead of reading 40 GB of zeros (docs/research/llamacpp-fit-oracle.md).

Root and a running lab only (`r1fleet lab up`); bench/llamacpp_oracle.py prints the comparison with
the planner, and tests/lab/test_oracle.py holds the planner to it.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from r1fleet.plan.catalog import Model
from r1fleet.lab import hosts, paths
from r1fleet.lab.shape_gguf import write_header
from r1fleet.tensor_split import flag_for_layers, format_flag

ORACLE_HOST = "lab-dual3090"
REMOTE_DIR = "/var/tmp/r1fleet-oracle"
RPC_BASE_PORT = 50200  # the oracle's own capped rpc-servers, apart from the lab's GPU stand-ins
SERVER_PORT = 18099
RPC_ADDRESS_SPACE_KIB = 4 * 1024 * 1024  # any real weight buffer fails; dry runs allocate nothing
SERVER_ADDRESS_SPACE_KIB = 8 * 1024 * 1024

#  |   - RPC0 (127.0.0.1:50200) | 24105 = 24105 + ( 180 =    31 +      90 +      59) +        -180 |
BREAKDOWN = re.compile(
    r"common_memory_breakdown_print: \|\s+- (?P<dev>\S+) \((?P<where>[^)]*)\)\s*\|\s*\d+ = \d+ \+ \(\s*(?P<self>\d+) =\s*"
    r"(?P<model>\d+) \+\s*(?P<context>\d+) \+\s*(?P<compute>\d+)\)"
)


class OracleError(RuntimeError):
    pass


@dataclass(frozen=True)
class DeviceProjection:
    device: str
    model_mib: int
    context_mib: int
    compute_mib: int

    @property
    def total_mib(self) -> int:
        return self.model_mib + self.context_mib + self.compute_mib


def parse_projection(log: str) -> list[DeviceProjection]:
    """The first (pre-pass) memory breakdown of each device, in device order."""
    seen: dict[str, DeviceProjection] = {}
    for m in BREAKDOWN.finditer(log):
        name = f"{m['dev']}[{m['where']}]"
        seen.setdefault(name, DeviceProjection(name, int(m["model"]), int(m["context"]), int(m["compute"])))
    return list(seen.values())


def _ssh(host: str, script: str, stdin: bytes | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    if not paths.SSH_CONFIG.exists():
        raise OracleError(f"the lab is not up (no {paths.SSH_CONFIG}); start it with `sudo r1fleet lab up`")
    return subprocess.run(hosts.ssh_argv(host, script, timeout=10), input=stdin, capture_output=True, timeout=timeout)


@lru_cache(maxsize=8)
def _header(model: Model) -> tuple[bytes, int]:
    with tempfile.TemporaryDirectory() as tmp:
        header = Path(tmp) / "header.gguf"
        size = write_header(model, header)
        return header.read_bytes(), size


def place_model(model: Model, host: str = ORACLE_HOST) -> str:
    """Put the model's shape-only GGUF on the host (once per header); return its path there."""
    data, size = _header(model)
    remote = f"{REMOTE_DIR}/{model.id}-{hashlib.sha256(data).hexdigest()[:12]}.gguf"
    q = shlex.quote
    script = (f"set -e; mkdir -p {REMOTE_DIR}; test -e {q(remote)} && exit 0; "
              f"cat > {q(remote)}.part; truncate -s {size} {q(remote)}.part; mv {q(remote)}.part {q(remote)}")
    done = _ssh(host, script, stdin=data)
    if done.returncode != 0:
        raise OracleError(f"{host}: cannot place {model.id}: {done.stderr.decode().strip()}")
    return remote


def project(
    model: Model,
    blocks_per_device: list[int],
    context: int,
    kv_type: str = "f16",
    flash_attention: bool = True,
    host: str = ORACLE_HOST,
    ubatch: int = 512,
) -> list[DeviceProjection]:
    """llama-server's own per-device projection for the model split as `blocks_per_device` (output on the last)."""
    path = place_model(model, host)
    ports = [RPC_BASE_PORT + i for i in range(len(blocks_per_device))]
    rpc = ",".join(f"127.0.0.1:{p}" for p in ports)
    args = ["-m", path, "--rpc", rpc, "-ngl", "999", "-c", str(context), "-fa", "on" if flash_attention else "off",
            "-ctk", kv_type, "-ctv", kv_type, "--parallel", "1", "--host", "127.0.0.1", "--port", str(SERVER_PORT),
            "-lv", "4", "--load-mode", "none", "--no-warmup"]
    if ubatch != 512:  # as Ollama passes its automatic batch: -b N -ub N (llm/llama_server.go appendBatchArgs)
        args += ["-b", str(ubatch), "-ub", str(ubatch)]
    if len(blocks_per_device) > 1:
        args += ["--tensor-split", format_flag(flag_for_layers(blocks_per_device)), "--split-mode", "layer"]
    q = shlex.quote
    starts = " ".join(
        f"(ulimit -v {RPC_ADDRESS_SPACE_KIB}; exec \"$rpc\" -H 127.0.0.1 -p {p} -t 1 >/dev/null 2>&1) & pids=\"$pids $!\";"
        for p in ports
    )
    # Bounded waits: the port free of the previous case's servers, then taken by this case's.
    frees = " ".join(f"i=0; while ss -ltnH | grep -q 127.0.0.1:{p} && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done;" for p in ports)
    waits = " ".join(f"i=0; until ss -ltnH | grep -q 127.0.0.1:{p} || [ $i -ge 100 ]; do sleep 0.1; i=$((i+1)); done;" for p in ports)
    # The projection is printed before the real load; stop the server as soon as the fit step has spoken
    # (a small model's real load would otherwise succeed within the cap and start serving).
    script = (
        "rpc=$(ls /usr/libexec/*/llama/bin/ggml-rpc-server | head -n1); pids=; log=$(mktemp); "
        f"{frees} {starts} trap 'kill $pids 2>/dev/null; wait $pids 2>/dev/null; rm -f $log' EXIT; {waits} "
        f"(ulimit -v {SERVER_ADDRESS_SPACE_KIB}; exec llama-server {' '.join(q(a) for a in args)}) > $log 2>&1 & srv=$!; "
        "i=0; while kill -0 $srv 2>/dev/null && ! grep -q common_fit_params $log && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; "
        "kill $srv 2>/dev/null; wait $srv 2>/dev/null; "
        "grep -E 'common_memory_breakdown_print|error|failed' $log | head -n 40"
    )
    done = _ssh(host, script, timeout=240)
    log = done.stdout.decode(errors="replace")
    devices = parse_projection(log)
    if len(devices) != len(blocks_per_device):  # the host's own row has no device address and is left out
        raise OracleError(f"{host}: llama-server printed no projection for {model.id}:\n{log[-2000:]}")
    return devices
