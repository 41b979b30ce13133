"""A dry run is dry: preparing a deploy (what `pyinfra --dry` and the prompt before a confirmed run do) fetches
nothing into the controller's cache, reads no registry and starts no cache server; running it does all three
(r1fleet/operations/fleet_cache.py). The upstream here is a real HTTP server on this machine that counts what
it is asked for; the host is pyinfra's @fake."""

from __future__ import annotations

import hashlib
import http.server
import threading
from dataclasses import replace

import pytest
from deploy_harness import llama_cpp_role, ollama_role, run_role

import r1fleet.cache.registry
from r1fleet.artifacts.llama_cpp_install import llama_cpp_install
from r1fleet.artifacts.ollama_release import ollama_release
from r1fleet.artifacts.pins import Download, Platform
from r1fleet.fleet.config import HostConfig
from r1fleet.operations import fleet_cache
from r1fleet.records import GgufFile, HostPlan

BODY = b"GGUF" + bytes(range(256)) * 64
SHA = hashlib.sha256(BODY).hexdigest()
FORKY = Platform(arch="amd64", distro_id="debian", codename="forky", tegra_major=None)


@pytest.fixture
def upstream():
    """An upstream that serves BODY at /70b.gguf and counts every request."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()
    server.server_close()


@pytest.fixture
def cache_on(monkeypatch, tmp_path):
    """The controller's cache turned on, in a directory of this test, with no server left from another test."""
    monkeypatch.setenv("R1FLEET_CACHE", "on")
    servers: dict = {}
    monkeypatch.setattr(fleet_cache, "_servers", servers)
    monkeypatch.setattr(fleet_cache, "_caches", {})
    yield tmp_path / "cache"
    for server, _ in servers.values():
        server.__exit__(None, None, None)


def llama_host(url: str):
    plan = HostPlan(host="h1", model="deepseek-r1-distill-llama-70b", ollama_tag="deepseek-r1:70b-llama-distill-q4_K_M",
                    backend="llama.cpp", placement="multi-gpu", fits=True, context_length=8192, kv_cache_type="q8_0",
                    flash_attention=True, tensor_split=[38, 42], vendor="nvidia", compute_caps=["8.6", "8.6"],
                    gguf=GgufFile(url=f"{url}/70b.gguf", file="70b.gguf", sha256=SHA, size_bytes=len(BODY)))
    settings = HostConfig(name="h1", address="127.0.0.1")
    install = llama_cpp_install(FORKY, plan, settings, {"llama.cpp-tools", "libggml0-backend-cuda"})
    download = Download(name="70b.gguf", url=f"{url}/70b.gguf", sha256=SHA, size=len(BODY))
    return plan, settings, install, download


def test_preparing_fetches_nothing_and_starts_no_server(upstream, cache_on, monkeypatch):
    url, asked = upstream
    data = {"r1fleet_cache_dir": str(cache_on), "ssh_hostname": "127.0.0.1"}
    run = run_role(llama_cpp_role, *llama_host(url), data=data, execute=False, monkeypatch=monkeypatch)
    assert asked == []  # not one request upstream
    assert not cache_on.exists() or not any(cache_on.rglob("*.part")) and not any(cache_on.rglob(SHA))
    assert fleet_cache._servers == {}  # no cache server on the LAN
    # what it would fetch is named, with its size, in the operations a dry run lists
    assert run.has_op("Model 70b.gguf (16.0 KiB)")


def test_running_fetches_once_into_the_cache_and_the_host_takes_it_from_there(upstream, cache_on, monkeypatch):
    url, asked = upstream
    data = {"r1fleet_cache_dir": str(cache_on), "ssh_hostname": "127.0.0.1"}
    run = run_role(llama_cpp_role, *llama_host(url), data=data, monkeypatch=monkeypatch)
    assert not run.failed
    assert asked == ["/70b.gguf"]  # the controller fetched it, once
    assert (cache_on / "sha256" / SHA).read_bytes() == BODY
    (base,) = [base for _, base in fleet_cache._servers.values()]
    fetch = run.script("70b.gguf.part")
    assert f"{base}/sha256/{SHA}" in fetch and f"{url}/70b.gguf" in fetch  # the cache, the upstream as fallback
    assert fetch.index(f"{base}/sha256/{SHA}") < fetch.index(f"{url}/70b.gguf")
    # another deploy at once on this host stops rather than append to the same part (exclusive, audit L1)
    assert fetch.index("flock -n 9") < fetch.index("curl ")


def test_an_artifact_pinned_by_sha256_alone_is_bounded_by_the_caches_verified_copy(upstream, cache_on, monkeypatch):
    """Issue 21: an artifact without a pinned size (an Ollama release archive) reaches the host with the size of the
    copy the controller verified; the host's curl stops there, the upstream fallback's too (--max-filesize)."""
    url, _ = upstream
    data = {"r1fleet_cache_dir": str(cache_on), "ssh_hostname": "127.0.0.1"}
    plan, settings, install, download = llama_host(url)
    run = run_role(llama_cpp_role, plan, settings, install, replace(download, size=None), data=data, monkeypatch=monkeypatch)
    fetch = run.script("70b.gguf.part")
    assert fetch.count("curl -fSL") == fetch.count(f"--max-filesize {len(BODY)} ") == 3  # cache, upstream, start over


def test_preparing_reads_no_registry_and_running_reads_it_once(monkeypatch):
    reads: list[str] = []
    unreachable = r1fleet.cache.registry.fetch_manifest  # the role tests' registry: cannot be reached

    def counted(registry: str, tag: str) -> bytes:
        reads.append(tag)
        return unreachable(registry, tag)
    monkeypatch.setattr(r1fleet.cache.registry, "fetch_manifest", counted)
    plan = HostPlan(host="h1", model="deepseek-r1-distill-qwen-7b", ollama_tag="deepseek-r1:7b-qwen-distill-q4_K_M",
                    backend="ollama", placement="gpu", fits=True, context_length=16384, kv_cache_type="q8_0",
                    flash_attention=True, vendor="nvidia")
    settings = HostConfig(name="h1", address="10.0.0.1")
    release = ollama_release("h1", FORKY, plan)
    args = (plan, settings, release, None)
    run = run_role(ollama_role, *args, execute=False, monkeypatch=monkeypatch)
    assert reads == [] and run.has_op(f"Model {plan.ollama_tag}")
    run = run_role(ollama_role, *args, monkeypatch=monkeypatch)
    assert reads == [plan.ollama_tag]
    # the controller cannot read the registry: the host pulls the exact tag itself, in the same operation
    assert run.ran(f"Model {plan.ollama_tag}", f"pull {plan.ollama_tag}")
