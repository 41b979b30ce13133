"""The stand-in Ollama (r1fleet/lab/standins/ollama): its HTTP API, store layout, CLI and release archive.

The stand-in replaces the one thing this machine cannot get (the Ollama binary), so these tests
hold it to the real formats r1fleet's roles and verification read (Ollama docs/api.md)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

STANDIN_DIR = Path(__file__).resolve().parents[2] / "r1fleet" / "lab" / "standins" / "ollama"
OLLAMA = STANDIN_DIR / "ollama"
TAG = "r1fleet/tiny:test-q4_1"
# The interpreter that runs the stand-in (e.g. a lab host's python3 to check that version too)
PYTHON = os.environ.get("R1FLEET_STANDIN_PYTHON", sys.executable)


def gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def write_gguf(path: Path, kv: dict[str, Any], tensors: list[tuple[str, list[int]]]) -> None:
    """A minimal valid GGUF v3 file: header, key/values (u32, string, string-array) and tensor infos."""
    body = b""
    for key, value in kv.items():
        body += gguf_string(key)
        if isinstance(value, int):
            body += struct.pack("<I", 4) + struct.pack("<I", value)
        elif isinstance(value, str):
            body += struct.pack("<I", 8) + gguf_string(value)
        else:  # list of strings
            body += struct.pack("<IIQ", 9, 8, len(value)) + b"".join(gguf_string(v) for v in value)
    for offset, (name, dims) in enumerate(tensors):
        body += gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        body += struct.pack("<IQ", 0, offset * 64)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + body)


# A Go TEMPLATE that can think, shaped as the library's: `.Thinking` between tags inside the range over `.Messages`
# (thinking.InferTags), the prompt ending with the opening tag.
THINKING_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}"
                     "{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n<think>")
# One that cannot: no `.Thinking` at all (a library tag whose template predates thinking).
PLAIN_TEMPLATE = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"

TINY_KV = {"general.architecture": "llama", "general.file_type": 3, "llama.block_count": 4,
           "llama.context_length": 2048, "llama.embedding_length": 64, "llama.attention.head_count": 4,
           "llama.attention.head_count_kv": 2, "tokenizer.ggml.tokens": [f"t{i}" for i in range(40)]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base: str, method: str, path: str, body: Any = None, data: bytes | None = None) -> tuple[int, Any]:
    payload = data if data is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=payload, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw, status, ctype = resp.read(), resp.status, resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        raw, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
    if "ndjson" in ctype:
        return status, [json.loads(line) for line in raw.splitlines()]
    return status, json.loads(raw) if raw and "json" in ctype else raw.decode()


def wait_until_serving(base: str, proc: subprocess.Popen[bytes], seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            return call(base, "GET", "/")[1] == "Ollama is running"
        except OSError:
            time.sleep(0.1)
    return False


# Test double for llama.cpp's llama-quantize (not installable on this machine; the lab runs Debian's real
# one, tests/lab): records its argv and environment and writes OUT as a rewrite of IN, so what the stand-in
# stores differs from the upload as it does with the real tool (which reorders the GGUF header).
FAKE_LLAMA_QUANTIZE = r"""#!PYTHON
import json, os, sys
open(sys.argv[0] + ".args", "w").write(json.dumps([sys.argv[1:], os.environ.get("OLLAMA_LLAMA_CPP_COMPAT")]))
flag, src, out, kind = sys.argv[1:]
data = open(src, "rb").read()
open(out, "wb").write(data + b"rewritten by the llama-quantize test double")
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ollama")
    port = free_port()
    quantize = tmp / "llama-quantize"
    quantize.write_text(FAKE_LLAMA_QUANTIZE.replace("PYTHON", PYTHON, 1))
    quantize.chmod(0o755)
    env = {**os.environ, "OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_MODELS": str(tmp / "models"),
           "R1FLEET_STANDIN_RUNNER": "none", "CUDA_VISIBLE_DEVICES": "-1", "OLLAMA_CONTEXT_LENGTH": "8192",
           "R1FLEET_STANDIN_QUANTIZE": str(quantize)}
    env.pop("R1FLEET_STANDIN_REGISTRY", None)
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen([PYTHON, str(OLLAMA), "serve"], env=env, stderr=log, stdout=log)
    base = f"http://127.0.0.1:{port}"
    if not wait_until_serving(base, proc):
        proc.kill()
        pytest.fail("stand-in ollama did not start: " + (tmp / "serve.log").read_text())
    gguf = tmp / "tiny.gguf"
    write_gguf(gguf, TINY_KV, [("token_embd.weight", [64, 100]), ("output_norm.weight", [64])])
    (tmp / "Modelfile").write_text(f'FROM ./tiny.gguf\nTEMPLATE """{THINKING_TEMPLATE}"""\nPARAMETER stop "<|end|>"\n'
                                   "PARAMETER temperature 0.6\n")
    created = subprocess.run([PYTHON, str(OLLAMA), "create", TAG, "-f", str(tmp / "Modelfile")],
                             env=env, capture_output=True, text=True, timeout=60)
    yield {"base": base, "env": env, "tmp": tmp, "gguf": gguf, "proc": proc, "created": created}
    proc.terminate()
    proc.wait(10)
    log.close()


def model_blob(server: dict[str, Any]) -> Path:
    """The stored model layer of the fixture's model (llama-quantize's output, not the upload)."""
    models = server["tmp"] / "models"
    manifest = json.loads((models / "manifests/registry.ollama.ai/r1fleet/tiny/test-q4_1").read_text())
    digest = next(l["digest"] for l in manifest["layers"] if l["mediaType"] == "application/vnd.ollama.image.model")
    return models / "blobs" / digest.replace(":", "-")


def test_cli_create_uploads_blob_and_writes_real_store_layout(server: dict[str, Any]) -> None:
    assert server["created"].returncode == 0, server["created"].stderr
    assert server["created"].stdout.strip().endswith("success")
    models = server["tmp"] / "models"
    gguf_hex = hashlib.sha256(server["gguf"].read_bytes()).hexdigest()
    manifest = json.loads((models / "manifests/registry.ollama.ai/r1fleet/tiny/test-q4_1").read_text())
    assert manifest["schemaVersion"] == 2
    kinds = {layer["mediaType"]: layer["digest"] for layer in manifest["layers"]}
    # the stored model layer is llama-quantize's COPY output, not the upload (server/create.go of v0.32.9)
    argv, compat = json.loads((server["tmp"] / "llama-quantize.args").read_text())
    assert argv[0] == "--allow-requantize" and argv[1] == str(models / "blobs" / f"sha256-{gguf_hex}")
    assert argv[3] == "COPY" and compat == "0"
    stored = (models / "blobs" / kinds["application/vnd.ollama.image.model"].replace(":", "-")).read_bytes()
    assert kinds["application/vnd.ollama.image.model"] == "sha256:" + hashlib.sha256(stored).hexdigest()
    assert kinds["application/vnd.ollama.image.model"] != f"sha256:{gguf_hex}"
    assert not list((models / "blobs").glob("COPY*"))  # the tool's temp output moved into the store
    assert "application/vnd.ollama.image.template" in kinds and "application/vnd.ollama.image.params" in kinds
    params = (models / "blobs" / kinds["application/vnd.ollama.image.params"].replace(":", "-")).read_text()
    assert json.loads(params) == {"stop": ["<|end|>"], "temperature": 0.6}


def test_create_without_llama_quantize_fails_as_ollama_does(server: dict[str, Any], tmp_path: Path) -> None:
    env = {**server["env"], "R1FLEET_STANDIN_QUANTIZE": "", "OLLAMA_MODELS": str(tmp_path / "models"),
           "OLLAMA_HOST": f"127.0.0.1:{free_port()}"}
    proc = subprocess.Popen([PYTHON, str(OLLAMA), "serve"], env=env, stderr=subprocess.DEVNULL)
    try:
        assert wait_until_serving(f"http://{env['OLLAMA_HOST']}", proc)
        created = subprocess.run([PYTHON, str(OLLAMA), "create", TAG, "-f", str(server["tmp"] / "Modelfile")],
                                 env=env, capture_output=True, text=True, timeout=60)
        assert created.returncode != 0 and "llama-quantize" in created.stderr
    finally:
        proc.terminate()
        proc.wait(10)


def test_tags_lists_the_model_with_manifest_digest(server: dict[str, Any]) -> None:
    status, body = call(server["base"], "GET", "/api/tags")
    assert status == 200
    [model] = body["models"]
    manifest = server["tmp"] / "models/manifests/registry.ollama.ai/r1fleet/tiny/test-q4_1"
    assert model["name"] == TAG
    assert model["digest"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert model["details"]["family"] == "llama" and model["details"]["quantization_level"] == "Q4_1"
    assert model["details"]["parameter_size"] == "6K"  # 64*100 + 64 elements
    listed = subprocess.run([PYTHON, str(OLLAMA), "list"], env=server["env"], capture_output=True, text=True)
    assert listed.stdout.splitlines()[1].split()[:2] == [TAG, model["digest"][:12]]


def test_show_reads_model_info_from_the_gguf_header(server: dict[str, Any]) -> None:
    status, body = call(server["base"], "POST", "/api/show", {"model": TAG})
    assert status == 200
    info = body["model_info"]
    assert info["general.architecture"] == "llama"
    assert info["llama.block_count"] == 4 and info["llama.context_length"] == 2048
    assert info["tokenizer.ggml.tokens"] is None  # long arrays are elided, as in Ollama
    assert info["general.parameter_count"] == 6464
    assert body["capabilities"] == ["completion", "thinking"]
    assert body["template"] == THINKING_TEMPLATE
    status, body = call(server["base"], "POST", "/api/show", {"model": "deepseek-r1:7b"})
    assert status == 404 and "not found" in body["error"]


def test_empty_generate_loads_the_model_and_ps_lists_it(server: dict[str, Any]) -> None:
    status, body = call(server["base"], "POST", "/api/generate", {"model": TAG, "keep_alive": "10m"})
    assert status == 200 and body["done"] is True and body["done_reason"] == "load"
    status, body = call(server["base"], "GET", "/api/ps")
    [running] = body["models"]
    assert running["name"] == TAG
    assert running["context_length"] == 2048  # OLLAMA_CONTEXT_LENGTH 8192 capped at the model's trained length
    assert running["size_vram"] == 0  # CUDA_VISIBLE_DEVICES=-1: CPU
    kv_cache = 2 * 4 * 2 * (64 // 4) * 2048 * 2
    assert running["size"] == model_blob(server).stat().st_size + kv_cache
    remaining = time.mktime(time.strptime(running["expires_at"][:19], "%Y-%m-%dT%H:%M:%S")) - time.time()
    assert 500 < remaining <= 600


def test_chat_without_stream_returns_content_thinking_and_counts(server: dict[str, Any]) -> None:
    status, body = call(server["base"], "POST", "/api/chat",
                        {"model": TAG, "stream": False, "think": True, "messages": [{"role": "user", "content": "Why is the sky blue?"}]})
    assert status == 200 and body["done"] is True
    assert body["message"]["content"].startswith("[stand-in ollama")
    assert body["message"]["thinking"]
    assert body["eval_count"] == len(body["message"]["content"].split()) and body["eval_duration"] > 0
    assert body["prompt_eval_count"] == 5


def test_generate_streams_ndjson_ending_with_statistics(server: dict[str, Any]) -> None:
    status, events = call(server["base"], "POST", "/api/generate", {"model": TAG, "prompt": "hello there", "think": False})
    assert status == 200 and all(not e["done"] for e in events[:-1]) and events[-1]["done"] is True
    text = "".join(e["response"] for e in events)
    assert text and not any("thinking" in e for e in events)
    assert events[-1]["eval_count"] == len(text.split())


def test_a_namespace_with_a_dot_is_no_name_and_its_manifest_is_not_listed(server: dict[str, Any]) -> None:
    """types/model/name.go:344-371 of v0.32.9 (no `.` in a namespace), manifest/manifest.go:204-210 (skipped)."""
    standin = standin_module()
    with pytest.raises(standin.ApiError):
        standin.parse_name("team.x/tiny:test")
    assert standin.parse_name("reg.lan/team_x/tiny.v2:q4.1").namespace == "team_x"
    store = server["tmp"] / "models" / "manifests" / "registry.ollama.ai"
    dotted = store / "team.x" / "tiny" / "test-q4_1"
    dotted.parent.mkdir(parents=True)
    dotted.write_bytes((store / "r1fleet" / "tiny" / "test-q4_1").read_bytes())
    try:
        assert [m["name"] for m in call(server["base"], "GET", "/api/tags")[1]["models"]] == [TAG]
    finally:
        dotted.unlink()
        dotted.parent.rmdir()
        dotted.parent.parent.rmdir()


def test_blob_upload_verifies_the_digest(server: dict[str, Any]) -> None:
    data = b"some bytes"
    wrong = "sha256:" + hashlib.sha256(b"other").hexdigest()
    status, body = call(server["base"], "POST", f"/api/blobs/{wrong}", data=data)
    assert status == 400 and "digest mismatch" in body["error"]
    right = "sha256:" + hashlib.sha256(data).hexdigest()
    assert call(server["base"], "HEAD", f"/api/blobs/{right}")[0] == 404
    assert call(server["base"], "POST", f"/api/blobs/{right}", data=data)[0] == 201
    assert call(server["base"], "HEAD", f"/api/blobs/{right}")[0] == 200


def test_pull_without_registry_fails_in_the_stream(server: dict[str, Any]) -> None:
    status, events = call(server["base"], "POST", "/api/pull", {"model": "deepseek-r1:7b"})
    assert status == 200 and events[0] == {"status": "pulling manifest"}
    assert "registry.ollama.ai/v2/library/deepseek-r1/manifests/7b" in events[-1]["error"]


def test_pull_from_a_standin_registry_directory_copies_manifest_and_blobs(server: dict[str, Any], tmp_path: Path) -> None:
    env = {**server["env"], "OLLAMA_MODELS": str(tmp_path / "other"), "R1FLEET_STANDIN_REGISTRY": str(server["tmp"] / "models"),
           "OLLAMA_HOST": f"127.0.0.1:{free_port()}"}
    proc = subprocess.Popen([PYTHON, str(OLLAMA), "serve"], env=env, stderr=subprocess.DEVNULL)
    try:
        assert wait_until_serving(f"http://{env['OLLAMA_HOST']}", proc)
        pulled = subprocess.run([PYTHON, str(OLLAMA), "pull", TAG], env=env, capture_output=True, text=True)
        assert pulled.returncode == 0 and pulled.stdout.splitlines()[-1] == "success", pulled.stderr
        src = (server["tmp"] / "models/manifests/registry.ollama.ai/r1fleet/tiny/test-q4_1").read_bytes()
        assert (tmp_path / "other/manifests/registry.ollama.ai/r1fleet/tiny/test-q4_1").read_bytes() == src
    finally:
        proc.terminate()
        assert proc.wait(10) == 0  # graceful SIGTERM


FAKE_LLAMA_SERVER = r"""#!PYTHON
# Test double for llama.cpp's llama-server (not installable on this machine): answers /health, /completion and
# /v1/chat/completions in llama-server's response formats and records its command line and each request.
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
open(sys.argv[0] + ".args", "w").write(json.dumps(sys.argv[1:]))
class H(BaseHTTPRequestHandler):
    def reply(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
    def do_GET(self):
        self.reply({"status": "ok"})
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open(sys.argv[0] + ".requests", "a") as log:
            log.write(json.dumps([self.path, req]) + "\n")
        timings = {"prompt_n": 11, "prompt_ms": 5.5, "predicted_n": 6, "predicted_ms": 120.0}
        if self.path == "/completion":
            asked = req["prompt"].rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0]
            text = "<think>about " + asked + "</think>Blue light scatters more."
            return self.reply({"content": text, "stop_type": "eos", "timings": timings})
        text = "<think>about " + req["messages"][-1]["content"] + "</think>Blue light scatters more."
        self.reply({"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "timings": timings})
port = int(sys.argv[sys.argv.index("--port") + 1])
HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def serve_with_fake_runner(server: dict[str, Any], tmp_path: Path, **env_extra: str):
    """A stand-in of its own whose runner is the FAKE_LLAMA_SERVER test double: (base URL, process, runner path)."""
    runner = tmp_path / "llama-server"
    runner.write_text(FAKE_LLAMA_SERVER.replace("PYTHON", PYTHON, 1))
    runner.chmod(0o755)
    port = free_port()
    env = {**server["env"], "R1FLEET_STANDIN_RUNNER": str(runner), "OLLAMA_HOST": f"127.0.0.1:{port}", **env_extra}
    proc = subprocess.Popen([PYTHON, str(OLLAMA), "serve"], env=env, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    assert wait_until_serving(base, proc)
    return base, proc, runner, env


def runner_requests(runner: Path) -> list[tuple[str, dict]]:
    return [tuple(json.loads(line)) for line in Path(str(runner) + ".requests").read_text().splitlines()]


def test_generation_is_proxied_to_a_llama_server_runner(server: dict[str, Any], tmp_path: Path) -> None:
    """The fixture's model has a Go TEMPLATE layer that can think, as library R1 tags do: the prompt is rendered
    by the server and sent to llama-server's /completion, the runner started without its own template
    (llm/llama_server.go:1-6, 774-782, 1622 of v0.32.9), and the reply split at the inferred tags."""
    base, proc, runner, _ = serve_with_fake_runner(server, tmp_path, OLLAMA_NUM_PARALLEL="2", OLLAMA_KV_CACHE_TYPE="q8_0")
    try:
        status, body = call(base, "POST", "/api/chat", {"model": TAG, "stream": False, "options": {"num_ctx": 1024},
                                                        "messages": [{"role": "user", "content": "sky?"}]})
        assert status == 200, body
        assert body["message"] == {"role": "assistant", "content": "Blue light scatters more.", "thinking": "about sky?"}
        assert (body["eval_count"], body["eval_duration"]) == (6, 120_000_000)
        assert (body["prompt_eval_count"], body["prompt_eval_duration"]) == (11, 5_500_000)
        [(path, request)] = runner_requests(runner)
        assert path == "/completion" and request["prompt"].endswith("sky?<|im_end|>\n<|im_start|>assistant\n<think>")
        args = json.loads(Path(str(runner) + ".args").read_text())
        blob = model_blob(server)
        assert args[args.index("-m") + 1] == str(blob)
        assert args[args.index("-c") + 1] == "2048" and args[args.index("-np") + 1] == "2"  # num_ctx x parallel
        assert args[args.index("--cache-type-k") + 1] == "q8_0"
        assert args[args.index("--chat-template") + 1] == "chatml" and "--no-jinja" in args
    finally:
        proc.terminate()
        assert proc.wait(15) == 0


def test_a_template_without_thinking_refuses_think_and_leaves_the_reasoning_inline(server: dict[str, Any],
                                                                                    tmp_path: Path) -> None:
    """A Go TEMPLATE without `.Thinking` (routes.go:2592-2607): `think: true` is a 400, and without it the reply is
    all content, R1's <think> text inline; a model without a template layer goes to /v1/chat/completions."""
    from r1fleet.verify.judge import ollama_chat_reply

    base, proc, runner, env = serve_with_fake_runner(server, tmp_path)
    plain, bare = "r1fleet/tiny:plain", "r1fleet/tiny:bare"
    (server["tmp"] / "Plain").write_text(f'FROM ./tiny.gguf\nTEMPLATE """{PLAIN_TEMPLATE}"""\n')
    (server["tmp"] / "Bare").write_text("FROM ./tiny.gguf\n")
    try:
        for name, modelfile in ((plain, "Plain"), (bare, "Bare")):
            subprocess.run([PYTHON, str(OLLAMA), "create", name, "-f", str(server["tmp"] / modelfile)], env=env,
                           capture_output=True, timeout=60, check=True)
        assert call(base, "POST", "/api/show", {"model": plain})[1]["capabilities"] == ["completion"]
        ask = {"model": plain, "stream": False, "messages": [{"role": "user", "content": "sky?"}]}
        assert call(base, "POST", "/api/chat", {**ask, "think": True}) == (400, {"error": f'"{plain}" does not support thinking'})
        status, body = call(base, "POST", "/api/chat", ask)
        assert status == 200 and body["message"] == {"role": "assistant", "content": "<think>about sky?</think>Blue light scatters more."}
        reply = ollama_chat_reply(body)  # verify reads the reasoning from the text
        assert (reply.content, reply.reasoning) == ("Blue light scatters more.", "about sky?")
        assert call(base, "POST", "/api/chat", {**ask, "model": bare})[0] == 200
        assert [path for path, _ in runner_requests(runner)] == ["/completion", "/v1/chat/completions"]
    finally:
        for name in (plain, bare):  # the module's store holds only its own model for the tests after this one
            call(base, "DELETE", "/api/delete", {"model": name})
        proc.terminate()
        proc.wait(15)


# Test double for a llama-server that takes `SLOW_LOAD_S` to load (a large model from a slow disk): it answers
# /health only after that, as llama-server answers 503 while loading.
SLOW_LLAMA_SERVER = r"""#!PYTHON
import sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
time.sleep(float(sys.argv[0].rsplit("-", 1)[1]))
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "15"); self.end_headers(); self.wfile.write(b'{"status":"ok"}')
HTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), H).serve_forever()
"""


def test_a_load_whose_client_leaves_is_aborted_and_one_that_waits_stays(server: dict[str, Any], tmp_path: Path) -> None:
    """As Ollama v0.32.9 does (llm/llama_server.go:1297-1299, server/sched.go:733-738): a client that gives up
    while the runner still loads takes the load with it; a client that waits gets the model loaded."""
    runner = tmp_path / "llama-server-3"
    runner.write_text(SLOW_LLAMA_SERVER.replace("PYTHON", PYTHON, 1))
    runner.chmod(0o755)
    port = free_port()
    env = {**server["env"], "R1FLEET_STANDIN_RUNNER": str(runner), "OLLAMA_HOST": f"127.0.0.1:{port}"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([PYTHON, str(OLLAMA), "serve"], env=env, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until_serving(base, proc)
        subprocess.run([PYTHON, str(OLLAMA), "create", TAG, "-f", str(server["tmp"] / "Modelfile")], env=env,
                       capture_output=True, timeout=60, check=True)
        load = urllib.request.Request(base + "/api/generate", data=json.dumps({"model": TAG, "keep_alive": -1}).encode())
        with pytest.raises(OSError):  # the client's own bound, shorter than the load
            urllib.request.urlopen(load, timeout=1)
        time.sleep(4)  # past the runner's load: had the load gone on, the model would be in memory by now
        assert call(base, "GET", "/api/ps")[1]["models"] == []
        assert "client connection closed before llama-server finished loading, aborting load" in log.read_text()
        with urllib.request.urlopen(load, timeout=30) as answer:  # a client that waits
            assert json.loads(answer.read())["done_reason"] == "load"
        assert [m["name"] for m in call(base, "GET", "/api/ps")[1]["models"]] == [TAG]
    finally:
        proc.terminate()
        proc.wait(15)


def test_keep_alive_expiry_unloads_and_zero_unloads_at_once(server: dict[str, Any]) -> None:
    base = server["base"]
    call(base, "POST", "/api/generate", {"model": TAG, "keep_alive": "1s"})
    assert [m["name"] for m in call(base, "GET", "/api/ps")[1]["models"]] == [TAG]
    time.sleep(2.5)
    assert call(base, "GET", "/api/ps")[1]["models"] == []
    call(base, "POST", "/api/generate", {"model": TAG, "keep_alive": -1})
    status, body = call(base, "POST", "/api/generate", {"model": TAG, "keep_alive": 0})
    assert status == 200 and body["done_reason"] == "unload"
    assert call(base, "GET", "/api/ps")[1]["models"] == []


def test_version_and_delete(server: dict[str, Any]) -> None:
    version = subprocess.run([PYTHON, str(OLLAMA), "--version"], env=server["env"], capture_output=True, text=True)
    assert version.stdout.startswith("ollama version is ")
    assert call(server["base"], "GET", "/api/version")[1]["version"] in version.stdout
    status, _ = call(server["base"], "DELETE", "/api/delete", {"model": TAG})
    assert status == 200
    assert call(server["base"], "GET", "/api/tags")[1]["models"] == []
    assert call(server["base"], "DELETE", "/api/delete", {"model": TAG})[0] == 404


def build(outdir: Path, version: str = "0.32.15-standin") -> None:
    subprocess.run([PYTHON, str(STANDIN_DIR / "build.py"), str(outdir), "--version", version], check=True)


def test_release_archive_is_deterministic_with_real_layout(tmp_path: Path) -> None:
    build(tmp_path / "a")
    time.sleep(1.1)  # timestamps have 1 s resolution: a build that leaked the clock would now differ
    build(tmp_path / "b")
    sums = (tmp_path / "a/sha256sum.txt").read_text()
    assert sums == (tmp_path / "b/sha256sum.txt").read_text()
    amd64 = tmp_path / "a/ollama-linux-amd64.tar.zst"
    assert f"{hashlib.sha256(amd64.read_bytes()).hexdigest()}  ./ollama-linux-amd64.tar.zst" in sums.splitlines()
    # zstd as the release workflow packs it; the tool the role and install.sh use unpacks it
    raw = subprocess.run(["zstd", "-dc", str(amd64)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        binary = tar.getmember("bin/ollama")
        assert binary.mode == 0o755 and binary.uid == 0 and tar.getmember("lib/ollama/README.txt").isfile()
        assert b'VERSION = "0.32.15-standin"' in tar.extractfile(binary).read()
        for tool in ("llama-server", "llama-quantize"):  # where Ollama looks for them (llm/llama_binary.go)
            assert tar.getmember(f"lib/ollama/{tool}").mode == 0o755
        link = tar.getmember("lib/ollama/cuda_v12/libcudart.so.12")
        assert link.issym() and link.linkname == "libcudart.so.12.8.90"
        assert not any(name.startswith("./") for name in tar.getnames())
    assert (tmp_path / "a/VERSION").read_text().strip() == "0.32.15-standin"


def test_the_stand_in_reports_the_pinned_version_and_the_lab_builds_it_per_content(monkeypatch, tmp_path) -> None:
    """It stands for the pinned release (r1fleet/artifacts/versions.yaml), so it reports that version; the lab's
    mirror keeps each checkout's build in a folder named by its sources, so labs shared by checkouts never mix them."""
    from r1fleet.artifacts.pins import load_pins
    from r1fleet.lab import mirror

    assert standin_module().VERSION == load_pins().ollama.version
    built = mirror.ollama_stand_in_dir()
    assert built.startswith("ollama-standin-") and built == mirror.ollama_stand_in_dir()
    changed = tmp_path / "build.py"
    changed.write_bytes(mirror.OLLAMA_HOOK.read_bytes() + b"# another checkout\n")
    (tmp_path / "ollama").write_bytes(OLLAMA.read_bytes())
    monkeypatch.setattr(mirror, "OLLAMA_HOOK", changed)
    assert mirror.ollama_stand_in_dir() != built


def standin_module():
    """The stand-in script as a module, for its pure parts."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("standin_ollama", str(OLLAMA))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("standin_ollama", loader))
    loader.exec_module(module)
    return module


def test_ps_sizes_come_from_what_the_runner_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real llama-server load logs (captured in the lab) read as Ollama reads them for /api/ps."""
    standin, mib = standin_module(), 1024 * 1024
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    file_size = 98362432
    on_gpu = standin.RunnerLog()
    for line in (fixtures / "llama-server-buffers__rpc-1dev__b11669.txt").read_text().splitlines():
        on_gpu.feed(line)
    size, vram = on_gpu.memory(file_size)
    assert vram == sum(int(v * mib) for v in (92.10, 180.00, 21.51)) and size == vram  # full offload: all on the GPU
    on_cpu = standin.RunnerLog()
    for line in (fixtures / "llama-server-buffers__cpu-only__b11669.txt").read_text().splitlines():
        on_cpu.feed(line)
    assert on_cpu.memory(file_size)[1] == 0  # nothing on a GPU: size_vram 0, so verify sees the spill
    assert standin.RunnerLog().memory(file_size) == (file_size, file_size)  # no buffer lines: Ollama's fallback
    assert not standin.is_gpu_buffer("CUDA_Host") and standin.is_gpu_buffer("RPC0[127.0.0.1:50100]")
    # the lab's GPUs reach the runner only as CUDA_VISIBLE_DEVICES names them
    monkeypatch.setenv("R1FLEET_LAB_GPU_RPC", "GPU-a=127.0.0.1:50100,GPU-b=127.0.0.1:50101")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-b")
    assert standin.lab_rpc_devices() == ["127.0.0.1:50101"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert standin.lab_rpc_devices() == []


def test_ps_size_trims_only_the_mmap_views_and_sums_the_overflow() -> None:
    """Two details of Ollama's MemorySize (llm/llama_server.go:2606-2646, 2767-2771, 2795-2821 of v0.32.9): model
    weights above the file's size come off the CPU_Mapped views only, at most their size (a repacked CPU copy is
    memory of its own), and the overflowing layers of every fit line add up."""
    mib, file_size = 1024 * 1024, 100 * 1024 * 1024
    log = standin_module().RunnerLog()
    for line in ("load_tensors:   CPU_Mapped model buffer size =    10.00 MiB",
                 "load_tensors:        CUDA0 model buffer size =   110.00 MiB",
                 "load_tensors:   CPU_REPACK model buffer size =    40.00 MiB",
                 "llama_kv_cache:      CUDA0 KV buffer size =    16.00 MiB"):
        log.feed(line)
    # 10 + 110 file-backed is 20 MiB above the file: trimmed from the 10 MiB view, at most its size; the 40 MiB
    # repack is kept
    assert log.memory(file_size) == (int((10 + 110 + 40 + 16 - 10) * mib), int((110 + 16) * mib))
    log.feed("load_tensors: offloaded 33/33 layers to GPU")
    assert log.memory(file_size) == (int((110 + 16) * mib),) * 2  # every layer offloaded: all counted on the GPU
    for line in ("common_params_fit_impl: fitting ... (2 overflowing)", "common_params_fit_impl: fitting ... (3 overflowing)"):
        log.feed(line)
    assert log.overflow == 5  # summed, where the last value alone would be 3
    assert log.memory(file_size)[0] == int((10 + 110 + 40 + 16 - 10) * mib)  # layers overflowed: the real total


def test_the_official_openai_client_lists_chats_and_streams(server: dict[str, Any]) -> None:
    """/v1/models and /v1/chat/completions in the shapes openai/openai.go of v0.32.9 writes, read by the
    official `openai` client; an unknown model is a 404 in OpenAI's error shape."""
    import openai

    # the module's model, again (an earlier test deletes it)
    created = subprocess.run([PYTHON, str(OLLAMA), "create", TAG, "-f", str(server["tmp"] / "Modelfile")],
                             env=server["env"], capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0)
    models = client.models.list()
    assert [m.id for m in models.data] == [TAG] and models.data[0].owned_by == "r1fleet"
    assert client.models.retrieve(TAG).id == TAG
    reply = client.chat.completions.create(model=TAG, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=TAG, messages=[{"role": "user", "content": "hi"}], stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope:latest", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["type"] == "not_found_error"


def test_thinking_is_split_as_ollamas_parser_splits_it() -> None:
    """thinking/parser.go of v0.32.9: the opening tag is needed unless the prompt ends with it."""
    split = standin_module().split_thinking
    assert split("<think>\nadd them</think>\n\n12", opened=False) == ("add them", "12")
    assert split("add them</think>12", opened=True) == ("add them", "12")
    assert split("add them</think>12", opened=False) == ("", "add them</think>12")  # thinking skipped: all content
    assert split("  <think>still going", opened=False) == ("still going", "")


def test_embed_follows_the_runner_and_a_generative_model_has_none(server: dict[str, Any]) -> None:
    """/api/embed (server/routes.go:789-1012): empty input only loads; a generative model's runner was not
    started with --embeddings, so the request gets llama-server's 501; bad input is a 400."""
    subprocess.run([PYTHON, str(OLLAMA), "create", TAG, "-f", str(server["tmp"] / "Modelfile")],
                   env=server["env"], capture_output=True, timeout=60, check=True)
    assert call(server["base"], "POST", "/api/embed", {"model": TAG, "input": []}) == (200, {"model": TAG, "embeddings": []})
    status, body = call(server["base"], "POST", "/api/embed", {"model": TAG, "input": "hello"})
    assert status == 501 and "--embeddings" in body["error"]
    assert call(server["base"], "POST", "/api/embed", {"model": TAG, "input": [1, 2]})[0] == 400
