"""The pool head's start check (issue 23 item 6), run as systemd runs its ExecStartPre: a worker that does not give
llama-server the devices planned on it (another RPC protocol version, another server on its port) fails the head's
start, naming the worker; so does a head that does not list its own planned GPUs.

Test double (header rule): llama-server itself, which this machine has no build of, is a shell script printing what
llama.cpp's `--list-devices` prints (common/arg.cpp:1141-1163 at 0c1e570: `Available devices:`, then
`  NAME: DESCRIPTION (N MiB, M MiB free)`, an RPC device's description being its endpoint) and, for a worker of
another protocol major, what this build prints before it aborts (ggml/src/ggml-rpc/ggml-rpc.cpp:356-358, 547-551).
The worker's TCP port is a real socket of this test."""

from __future__ import annotations

import socket
import subprocess

import pytest
from pool_fixtures import hardware, head_config, pool_plan

from r1fleet.lock.served import served_in_pool
from r1fleet.operations.tcp_health import TcpEndpoint
from r1fleet.roles.llama_cpp.pool import PoolHead, wait_for_workers

FAKE = """#!/bin/sh
# a stand-in for llama-server --list-devices (see this module's header)
if [ "$1" = --rpc ]; then cat "$FAKE_DIR/rpc"; exit "$(cat "$FAKE_DIR/rpc.rc")"; fi
cat "$FAKE_DIR/local"
"""
CUDA = "Available devices:\n  CUDA0: NVIDIA GeForce RTX 3090 (24124 MiB, 23853 MiB free)\n"


@pytest.fixture
def worker_port():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(8)
        yield listening.getsockname()[1]


def start_check(tmp_path, port: int, rpc: str, rc: int = 0, local: str = CUDA) -> subprocess.CompletedProcess:
    binary = tmp_path / "llama-server"
    binary.write_text(FAKE)
    binary.chmod(0o755)
    (tmp_path / "rpc").write_text(rpc)
    (tmp_path / "rpc.rc").write_text(str(rc))
    (tmp_path / "local").write_text(local)
    plan = served_in_pool(head_config(), hardware("box-a", "GPU-aaaa"), pool_plan(), locked=False).plan
    head = PoolHead("big", "box-a", plan, (TcpEndpoint("box-b", "127.0.0.1", port),), wait_s=5, lent=(1,))
    return subprocess.run(wait_for_workers(head, str(binary)), capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "FAKE_DIR": str(tmp_path)})


def test_a_worker_that_gives_its_planned_device_passes(tmp_path, worker_port):
    run = start_check(tmp_path, worker_port, f"Available devices:\n  RPC0: 127.0.0.1:{worker_port} (24124 MiB, 23853 MiB free)\n"
                      "  CUDA0: NVIDIA GeForce RTX 3090 (24124 MiB, 23853 MiB free)\n")
    assert run.returncode == 0, run.stderr


def test_a_worker_of_another_protocol_version_fails_the_start_by_name(tmp_path, worker_port):
    said = ("RPC server version mismatch: 8.0.0\n"
            f"ggml-rpc.cpp:550: GGML_ABORT: RPC handshake failed for 127.0.0.1:{worker_port}\nAborted\n")
    run = start_check(tmp_path, worker_port, said, rc=134)
    assert run.returncode == 1
    assert (f"r1fleet: pool big: worker box-b (127.0.0.1:{worker_port}) gives llama-server fewer than the 1 device(s) "
            "planned on it") in run.stderr
    assert "check r1fleet-rpc-server.service on box-b" in run.stderr and "RPC server version mismatch: 8.0.0" in run.stderr


def test_a_worker_dropped_without_an_error_fails_the_start_by_name(tmp_path, worker_port):
    """Older builds register no device for a refused handshake and go on with the devices left."""
    run = start_check(tmp_path, worker_port, CUDA)
    assert run.returncode == 1 and f"worker box-b (127.0.0.1:{worker_port}) gives llama-server fewer" in run.stderr


def test_another_servers_device_does_not_count(tmp_path, worker_port):
    run = start_check(tmp_path, worker_port, "Available devices:\n  RPC0: 127.0.0.1:1 (24124 MiB, 23853 MiB free)\n")
    assert run.returncode == 1 and "worker box-b" in run.stderr


def test_a_head_without_its_planned_gpu_fails_the_start(tmp_path, worker_port):
    run = start_check(tmp_path, worker_port, f"Available devices:\n  RPC0: 127.0.0.1:{worker_port} (1 MiB, 1 MiB free)\n",
                      local="Available devices:\n  (none)\n")
    assert run.returncode == 1
    assert "r1fleet: pool big: the head box-a's llama-server lists fewer than its 1 planned GPU(s)" in run.stderr
