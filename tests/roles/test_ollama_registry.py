"""An Ollama model by registry: names and URLs as Ollama forms them, manifests checked against the pinned
weights, the lab's published registry read back over real HTTP, the cache's names (r1fleet/cache/store.py), and
the script a host runs to place the model (r1fleet/roles/ollama/registry.py), run here for real against
that registry."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import http.server
import json
import os
import pwd
import re
import socket
import stat
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import facts_for as ff
import pytest
from deploy_harness import run_role

from r1fleet.cache.store import ArtifactCache
from r1fleet.operations import fleet_cache
from r1fleet.errors import R1FleetError
from r1fleet.lab import registry as lab_registry
from r1fleet.cache.registry import (
    MANIFEST_ACCEPT,
    ManifestMoved,
    ModelName,
    RegistryModel,
    cached_manifest,
    fetch_manifest,
    manifest_key,
    ollama_manifest_path,
    ollama_model_layer,
    weights_problem,
    read_manifest,
)
from r1fleet.roles.ollama.registry import RegistryFetch, RegistrySource, place_registry_model

TAG = "r1fleet/smollm2:135m-instruct-q4_1"


def test_names_as_ollama_resolves_them():
    assert ModelName.parse("deepseek-r1:7b") == ModelName("registry.ollama.ai", "library", "deepseek-r1", "7b")
    assert ModelName.parse("r1fleet/smollm2") == ModelName("registry.ollama.ai", "r1fleet", "smollm2", "latest")
    assert ModelName.parse("reg.lan/team/m:q4").store_manifest("/m/") == "/m/manifests/reg.lan/team/m/q4"
    assert ModelName.parse("deepseek-r1:7b").blob_url("https://registry.ollama.ai/", "ab" * 32) == \
        "https://registry.ollama.ai/v2/library/deepseek-r1/blobs/sha256:" + "ab" * 32
    with pytest.raises(R1FleetError):
        ModelName.parse("a/b/c/d:e")


def test_ollama_manifest_paths_and_model_layer():
    assert ollama_manifest_path("/m/ollama", TAG) == "/m/ollama/manifests/registry.ollama.ai/r1fleet/smollm2/135m-instruct-q4_1"
    assert ollama_manifest_path("/m/", "deepseek-r1:32b-qwen-distill-q4_K_M") == \
        "/m/manifests/registry.ollama.ai/library/deepseek-r1/32b-qwen-distill-q4_K_M"
    manifest = {"layers": [{"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "a" * 64},
                           {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + "b" * 64}]}
    assert ollama_model_layer(manifest) == "b" * 64
    assert ollama_model_layer({"layers": []}) is None


@pytest.fixture(autouse=True)
def _no_registry():
    """This module serves its own registry (the conftest's fixture of that name hides every registry)."""


@pytest.fixture
def published(tmp_path: Path):
    """The lab registry, published from a small GGUF-named file, served by a real HTTP server that records the
    Accept header of each request."""
    gguf = tmp_path / "cache" / "model.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    root = tmp_path / "mirror"
    manifest_path = lab_registry.publish(root, TAG, gguf, sha, "llama", "Q4_1")
    accepts: list[str | None] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            accepts.append(self.headers.get("Accept"))
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"base": f"http://127.0.0.1:{server.server_port}/registry", "sha": sha, "gguf": gguf,
           "manifest": manifest_path, "root": root, "accepts": accepts}
    server.shutdown()


def test_the_lab_registry_serves_a_manifest_whose_weights_are_the_gguf(published):
    data = fetch_manifest(published["base"], TAG)
    assert data == published["manifest"].read_bytes()
    assert published["accepts"] == [MANIFEST_ACCEPT]  # asked as Ollama asks
    model = read_manifest(data, TAG, published["sha"])
    assert model.manifest.sha256 == hashlib.sha256(data).hexdigest() and model.manifest.size == len(data)
    config, weights, template = model.blobs  # the model layer first, then the template, as the library orders them
    assert template.size == len(lab_registry.CHATML_TEMPLATE.encode())
    assert weights.sha256 == published["sha"] and weights.size == published["gguf"].stat().st_size
    # every blob the manifest names is served by its digest, with those very bytes
    import urllib.request
    for blob in model.blobs:
        url = ModelName.parse(TAG).blob_url(published["base"], blob.sha256)
        body = urllib.request.urlopen(url, timeout=10).read()
        assert hashlib.sha256(body).hexdigest() == blob.sha256 and len(body) == blob.size


def test_publishing_again_gives_the_same_bytes(published):
    before = published["manifest"].read_bytes()
    again = lab_registry.publish(published["root"], TAG, published["gguf"], published["sha"], "llama", "Q4_1")
    assert again.read_bytes() == before


def test_a_manifest_with_other_weights_is_refused(published):
    data = published["manifest"].read_bytes()
    with pytest.raises(R1FleetError, match="re-pointed upstream"):
        read_manifest(data, TAG, "0" * 64)
    with pytest.raises(R1FleetError, match="not an Ollama manifest"):
        read_manifest(b"<html>login</html>", TAG, published["sha"])
    with pytest.raises(R1FleetError, match="not an Ollama manifest"):
        read_manifest(json.dumps({"layers": []}).encode(), TAG, published["sha"])
    hostile = json.loads(data)  # a blob name that would climb out of the store on the host
    hostile["layers"].append({"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:../../etc/x",
                              "size": 1})
    with pytest.raises(R1FleetError, match="is not a sha256 digest"):
        read_manifest(json.dumps(hostile).encode(), TAG, published["sha"])


def _adapter_in_another_case(document):
    document["layers"][0]["MediaType"] = "application/vnd.ollama.image.adapter"


def _layers_twice(document):
    document["Layers"] = document["layers"][:-1]


def _digest_twice(document):
    document["layers"][0]["Digest"] = "sha256:" + "d" * 64


def _a_list(document):
    document["manifests"] = [{"digest": "sha256:" + "d" * 64}]


@pytest.mark.parametrize("change, reason", [
    (_adapter_in_another_case, "'MediaType' beside 'mediaType'"), (_layers_twice, "'Layers' beside 'layers'"),
    (_digest_twice, "'Digest' beside 'digest'"), (_a_list, "a manifest list"),
])
def test_a_manifest_means_here_what_it_means_to_ollama(published, change, reason):
    """Go's encoding/json, which Ollama reads manifests with, matches keys to fields in any case, the last one
    winning: a key that Python would not read as Ollama does is refused (security review N1), here and in verify."""
    document = json.loads(published["manifest"].read_bytes())
    change(document)
    assert reason in (weights_problem(document, published["sha"]) or "")
    with pytest.raises(R1FleetError, match="is not the pinned model"):
        read_manifest(json.dumps(document).encode(), TAG, published["sha"])


@pytest.mark.parametrize("extra, reason", [
    ("model", "2 model layers"), ("adapter", "application/vnd.ollama.image.adapter"),
    ("projector", "application/vnd.ollama.image.projector"), ("embed", "application/vnd.ollama.image.embed"),
    ("something-new", "application/vnd.ollama.image.something-new"),
])
def test_the_weights_are_exactly_the_pinned_ones(published, extra, reason):
    """Ollama loads the last model layer and applies every adapter and projector (server/images.go GetModel): a
    manifest with the pinned weights and anything of that kind besides them is refused, as is verify's."""
    document = json.loads(published["manifest"].read_bytes())
    assert weights_problem(document, published["sha"]) is None
    with_text = {**document, "layers": [*document["layers"], {"mediaType": "application/vnd.ollama.image.license",
                                                                "digest": "sha256:" + "e" * 64, "size": 3}]}
    assert weights_problem(with_text, published["sha"]) is None  # text Ollama reads: no other weights
    hostile = {**document, "layers": [*document["layers"], {"mediaType": f"application/vnd.ollama.image.{extra}",
                                                             "digest": "sha256:" + "f" * 64, "size": 3}]}
    assert reason in (weights_problem(hostile, published["sha"]) or "")
    with pytest.raises(R1FleetError, match="is not the pinned model"):
        read_manifest(json.dumps(hostile).encode(), TAG, published["sha"])


def _with_layer(document: dict, index: int, **changes) -> bytes:
    layers = [dict(layer) for layer in document["layers"]]
    layers[index].update(changes)
    return json.dumps({**document, "layers": layers}).encode()


@pytest.mark.parametrize("make, reason", [
    (lambda d: _with_layer(d, 0, size=float("inf")), "Infinity is not a JSON number"),
    (lambda d: _with_layer(d, 0, size=float("nan")), "NaN is not a JSON number"),
    (lambda d: b"[" * 400_000 + b"]" * 400_000, "nested deeper than 16 levels"),
    (lambda d: json.dumps({**d, "x": json.loads("[" * 17 + "]" * 17)}).encode(), "nested deeper than 16"),
    (lambda d: _with_layer(d, 0, size=10 ** 15), "is not a number of bytes from 0 to 274,877,906,944"),
    (lambda d: json.dumps({**d, "config": {**d["config"], "size": 2 << 20}}).encode(), "from 0 to 1,048,576"),
    (lambda d: json.dumps({**d, "layers": [*d["layers"], {"mediaType": "application/vnd.ollama.image.template",
                                                          "digest": "sha256:" + "e" * 64, "size": 2 << 20}]}).encode(),
     "from 0 to 1,048,576"),
    (lambda d: _with_layer(d, 0, size=-1), "size -1"),
    (lambda d: _with_layer(d, 0, size="4096"), "size '4096'"),
    (lambda d: _with_layer(d, 0, size=4096.5), "size 4096.5"),
    (lambda d: _with_layer(d, 0, size=True), "size True"),
    (lambda d: json.dumps({**d, "config": "x"}).encode(), "'x' is not a layer"),
    (lambda d: json.dumps({**d, "layers": {"a": 1}}).encode(), "no config and layers"),
    (lambda d: b'{"layers": "\xff"}'.replace(b"\\xff", b"\xff"), "utf-8"),
])
def test_a_manifest_is_parsed_totally_and_bounded(tmp_path, make, reason):
    """Whatever a registry answers is a manifest or a refusal naming why (audit M3): never an OverflowError, a
    RecursionError or a 1 PB download."""
    gguf = tmp_path / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)))
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    document = json.loads(lab_registry.publish(tmp_path / "mirror", TAG, gguf, sha, "llama", "Q4_1").read_bytes())
    assert read_manifest(json.dumps(document).encode(), TAG, sha).blobs[1].sha256 == sha
    with pytest.raises(R1FleetError, match="not an Ollama manifest") as refused:
        read_manifest(make(document), TAG, sha)
    assert reason in str(refused.value)


def test_a_registry_that_drips_its_answer_is_cut_off():
    """A byte before each read timeout keeps a read going for ever; the deadline on the whole answer does not."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def drip():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            try:
                for _ in range(100):  # 5 s, then it stops: a client without the deadline fails, not hangs
                    conn.sendall(b"[")
                    time.sleep(0.05)
            except OSError:
                pass

    threading.Thread(target=drip, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(OSError, match="no whole answer within 0.5 s"):
        fetch_manifest(f"http://127.0.0.1:{listener.getsockname()[1]}", TAG, timeout_s=0.5)
    assert time.monotonic() - started < 2
    listener.close()


def test_the_cache_keeps_bytes_and_the_name_they_stood_for(tmp_path: Path):
    cache = ArtifactCache(tmp_path / "cache")
    data = b'{"schemaVersion":2}'
    sha = cache.put(data, f"{TAG} (manifest)")
    assert sha == hashlib.sha256(data).hexdigest() and cache.path_for(sha).read_bytes() == data
    assert cache.put(data, "again") == sha  # content-addressed: entered once
    key = f"https://registry.ollama.ai {TAG} manifest"
    assert cache.recall(key) is None
    cache.remember(key, sha)
    assert cache.recall(key) == sha
    assert [e.name for e in cache.status()] == [f"{TAG} (manifest)"]
    cache.prune()
    assert cache.recall(key) is None  # a name outlives nothing: its bytes are gone


# ------------------------------------------------------------------ placing a model on a host

API = "http://127.0.0.1:11434"


def fetch_of(published, base: str | None = None, fallback: str | None = None) -> RegistryFetch:
    """The fetch the controller hands a host: every file from `base` (the registry itself by default)."""
    model = read_manifest(published["manifest"].read_bytes(), TAG, published["sha"])
    name = ModelName.parse(TAG)

    def located(blob, upstream):
        return replace(blob, url=upstream.replace(published["base"], base or published["base"]),
                       fallback_url=upstream if fallback else None)
    return RegistryFetch(RegistryModel(TAG, located(model.manifest, name.manifest_url(published["base"])),
                                       tuple(located(b, name.blob_url(published["base"], b.sha256)) for b in model.blobs)))


def place(fetch: RegistryFetch, models_dir: Path, monkeypatch, listed=()):
    """What the operation runs on a host whose /api/tags lists `listed`, then that script run here for real."""
    user = pwd.getpwuid(os.getuid()).pw_name

    def role():
        place_registry_model(name="Place", source=fetch, tag=TAG, api=API, models_dir=str(models_dir), user=user,
                             binary="/usr/local/bin/ollama")
    run = run_role(role, responses=ff.ollama_api(API, list(listed), []), monkeypatch=monkeypatch)
    scripts = [c for c in run.commands if "set -e" in c or "r1fleet: " in c]
    result = subprocess.run(["sh", "-c", scripts[0]], capture_output=True, text=True, timeout=120) if scripts else None
    return run, result


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="the placement runs as the service user through runuser (root)")


@needs_root
def test_a_host_places_the_model_as_a_pull_leaves_it(published, tmp_path, monkeypatch):
    store = tmp_path / "ollama"
    run, result = place(fetch_of(published), store, monkeypatch)
    assert result is not None and result.returncode == 0, result.stderr
    manifest = store / "manifests/registry.ollama.ai/r1fleet/smollm2/135m-instruct-q4_1"
    assert manifest.read_bytes() == published["manifest"].read_bytes()  # same bytes: the same digest in /api/tags
    for blob in read_manifest(manifest.read_bytes(), TAG, published["sha"]).blobs:
        stored = store / "blobs" / f"sha256-{blob.sha256}"
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == blob.sha256
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600  # the service's UMask=0077, as its own pull
    assert not (store / ".r1fleet-incoming").exists()


@needs_root
def test_a_second_deploy_at_once_stops_instead_of_sharing_the_partial_files(published, tmp_path, monkeypatch):
    """Another r1fleet deploy placing a model on this host holds the store's lock (audit L1): this one stops with
    the reason, and touches nothing of the other's incoming files."""
    store = tmp_path / "ollama"
    (store / ".r1fleet-incoming").mkdir(parents=True)
    theirs = store / ".r1fleet-incoming" / f"sha256-{published['sha']}"
    theirs.write_bytes(b"GGUF, half")
    held = os.open(store, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _, result = place(fetch_of(published), store, monkeypatch)
    finally:
        os.close(held)
    assert result.returncode != 0 and "another deploy is downloading" in result.stderr
    assert theirs.read_bytes() == b"GGUF, half"
    _, again = place(fetch_of(published), store, monkeypatch)  # once the other is done
    assert again.returncode == 0, again.stderr


@needs_root
def test_a_corrupted_blob_never_enters_the_store(published, tmp_path, monkeypatch):
    served = published["root"] / "registry/v2/r1fleet/smollm2/blobs" / f"sha256:{published['sha']}"
    served.unlink()
    served.write_bytes(b"GGUF but not the pinned bytes")
    store = tmp_path / "ollama"
    _, result = place(fetch_of(published), store, monkeypatch)
    assert result.returncode != 0 and "sha256 mismatch" in result.stderr
    assert not (store / "blobs" / f"sha256-{published['sha']}").exists()  # (the config blob, verified first, may be there)
    assert not list((store / "manifests").rglob("135m-instruct-q4_1"))  # and no tag is listed


@needs_root
def test_a_host_that_cannot_reach_the_controller_takes_the_registry(published, tmp_path, monkeypatch):
    with socket.socket() as closed:  # a port nothing listens on: the controller's cache, firewalled
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}"
    _, result = place(fetch_of(published, base=nowhere, fallback=True), tmp_path / "ollama", monkeypatch)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ollama/manifests/registry.ollama.ai/r1fleet/smollm2/135m-instruct-q4_1").is_file()


@needs_root
def test_a_listed_tag_is_left_alone_and_a_refusal_stops_the_host(published, tmp_path, monkeypatch):
    run, result = place(fetch_of(published), tmp_path / "ollama", monkeypatch, listed=[TAG])
    assert result is None and not run.failed
    run, result = place(RegistryFetch(refused="the registry's tag has other weights"), tmp_path / "o", monkeypatch)
    assert result.returncode != 0 and "other weights" in result.stderr  # (the fake host itself fails nothing)


@pytest.mark.parametrize("answer, reason", [
    (b'{"config": {"digest": "sha256:' + b"a" * 64 + b'", "size": Infinity}, "layers": []}', "Infinity is not a JSON number"),
    (b"[" * 400_000 + b"]" * 400_000, "nested deeper than 16 levels"),
    (b"{" * (2 << 20), "answers more than 1048576 bytes"),
])
def test_a_registry_s_bad_answer_fails_the_host_that_needed_it_with_the_reason(published, monkeypatch, answer, reason):
    """Read when the operation runs (audit M3): the host stops at its model with the reason, and nothing escapes
    into pyinfra's run (which would end it for every host)."""
    monkeypatch.setenv("R1FLEET_CACHE", "on")
    monkeypatch.setattr(fleet_cache, "_caches", {})
    published["manifest"].write_bytes(answer)
    source = RegistrySource(TAG, published["base"], published["sha"], None, own_registry=True, model_files={})

    def role():
        place_registry_model(name="Place", source=source, tag=TAG, api=API, models_dir="/m/ollama", user="ollama",
                             binary="/usr/local/bin/ollama")
    run = run_role(role, responses={"exit 1": {"success": False}}, monkeypatch=monkeypatch,
                   data={"r1fleet_cache_dir": str(published["root"].parent / "controller-cache")})
    assert run.failed
    (refused,) = [c for c in run.op_commands("Place") if "r1fleet: " in c]
    assert reason in refused and published["base"] in refused


def test_a_host_that_pulls_the_tag_itself_is_held_to_the_pinned_weights(monkeypatch, tmp_path):
    """The controller cannot read registry.ollama.ai, so the host runs `ollama pull` itself (audit M1's leftover):
    what the pull wrote into the store is read back right after and checked like a placed manifest."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}"
    pin = "a" * 64
    source = RegistrySource(TAG, nowhere, pin, None, own_registry=False, model_files={})
    stored = re.compile(r"^(sudo -H -n )?(sh -c ')?head -c 1048577 /m/ollama/manifests/registry\.ollama\.ai/r1fleet/"
                        r"smollm2/135m-instruct-q4_1'?$")

    def role():
        place_registry_model(name="Place", source=source, tag=TAG, api=API, models_dir="/m/ollama", user="ollama",
                             binary="/usr/local/bin/ollama")

    def manifest(*weights: str) -> str:
        return json.dumps({"config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                      "digest": "sha256:" + "c" * 64, "size": 400},
                           "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{w}",
                                       "size": 1000} for w in weights]})
    monkeypatch.setenv("R1FLEET_CACHE", "on")
    monkeypatch.setattr(fleet_cache, "_caches", {})
    data = {"r1fleet_cache_dir": str(tmp_path / "cache")}
    good = run_role(role, responses={stored: manifest(pin), "exit 1": {"success": False}}, data=data, monkeypatch=monkeypatch)
    assert good.ran("Place", "ollama pull r1fleet/smollm2:135m-instruct-q4_1") and not good.failed
    bad = run_role(role, responses={stored: manifest(pin, "b" * 64), "exit 1": {"success": False}}, data=data,
                   monkeypatch=monkeypatch)
    (refused,) = [c for c in bad.op_commands("Place") if "r1fleet: " in c]
    assert bad.failed and "brought other weights than the pinned ones: it has 2 model layers, not one" in refused
    assert refused.startswith("rm -f /m/ollama/manifests/registry.ollama.ai/r1fleet/smollm2/135m-instruct-q4_1; ")


def test_anything_unexpected_on_the_controller_leaves_the_download_to_the_host(monkeypatch, tmp_path, capsys):
    """Whatever fetching into the controller's cache meets, the host downloads the artifact from upstream itself,
    and the reason is printed (fleet_cache.via_controller)."""
    monkeypatch.setenv("R1FLEET_CACHE", "on")
    monkeypatch.setattr(fleet_cache, "_caches", {})

    def odd(*args, **kwargs):
        raise OverflowError("int too large to convert to float")
    monkeypatch.setattr(ArtifactCache, "fetch", odd)

    class Host:
        name, data = "h1", {"r1fleet_cache_dir": str(tmp_path / "cache"), "ssh_hostname": "127.0.0.1"}
    url = fleet_cache.via_controller(None, Host(), "https://example.org/m.gguf", "a" * 64, "m.gguf", size=3)
    assert url == "https://example.org/m.gguf"
    assert ("[h1] m.gguf: not from the controller's cache (unexpected OverflowError: int too large to convert to "
            "float); the host downloads it itself") in capsys.readouterr().err


# ------------------------------------------------------------------ the manifest the controller takes


def test_the_controller_keeps_the_manifest_it_first_took_for_a_tag(published, tmp_path):
    cache = ArtifactCache(tmp_path / "cache")
    first = cached_manifest(cache, published["base"], TAG, published["sha"])
    assert len(published["accepts"]) == 1
    # the registry re-publishes the tag (a new template, the same weights): a rebuild still gets the first bytes
    document = json.loads(published["manifest"].read_bytes())
    published["manifest"].write_bytes(json.dumps(document, indent=1).encode())
    again = cached_manifest(cache, published["base"], TAG, published["sha"])
    assert again == first and len(published["accepts"]) == 1  # from the cache, the registry not asked
    assert ArtifactCache(tmp_path / "cache").recall(manifest_key(published["base"], TAG)) == first.manifest.sha256


def test_a_locked_manifest_is_the_one_served_or_the_host_is_stopped(published, tmp_path):
    locked = hashlib.sha256(published["manifest"].read_bytes()).hexdigest()
    document = json.loads(published["manifest"].read_bytes())
    published["manifest"].write_bytes(json.dumps(document, indent=1).encode())  # re-published upstream
    cache = ArtifactCache(tmp_path / "fresh-cache")  # a new controller: the locked bytes are not here
    with pytest.raises(ManifestMoved, match=f"the fleet lock has {locked[:12]}"):
        cached_manifest(cache, published["base"], TAG, published["sha"], locked=locked)
    relocked = hashlib.sha256(published["manifest"].read_bytes()).hexdigest()
    assert cached_manifest(cache, published["base"], TAG, published["sha"], locked=relocked).manifest.sha256 == relocked


def test_a_relock_takes_the_manifest_the_registry_moved_to(published, tmp_path):
    """The host stopped by ManifestMoved names a relock as its fix: the registry's manifest is kept in the cache,
    so the relock (lock_cli.with_manifest) finds it."""
    locked = hashlib.sha256(published["manifest"].read_bytes()).hexdigest()
    document = json.loads(published["manifest"].read_bytes())
    published["manifest"].write_bytes(json.dumps(document, indent=1).encode())
    cache = ArtifactCache(tmp_path / "cache")
    with pytest.raises(ManifestMoved):
        cached_manifest(cache, published["base"], TAG, published["sha"], locked=locked)
    moved = hashlib.sha256(published["manifest"].read_bytes()).hexdigest()
    assert cache.recall(manifest_key(published["base"], TAG)) == moved


def test_a_re_pinned_tag_is_read_from_the_registry_again(published, tmp_path):
    """catalog.yaml pins other weights for a tag than the manifest the cache kept: the registry is asked again."""
    cache = ArtifactCache(tmp_path / "cache")
    stale = b'{"schemaVersion":2,"config":{"digest":"sha256:' + b"a" * 64 + b'","size":1},"layers":[' \
            b'{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:' + b"b" * 64 + b'","size":1}]}'
    cache.remember(manifest_key(published["base"], TAG), cache.put(stale, "old"))
    model = cached_manifest(cache, published["base"], TAG, published["sha"])
    assert model.manifest.sha256 == hashlib.sha256(published["manifest"].read_bytes()).hexdigest()
    assert len(published["accepts"]) == 1 and cache.recall(manifest_key(published["base"], TAG)) == model.manifest.sha256


def test_model_names_are_ollamas_and_name_no_path_outside_the_store():
    assert ModelName.parse("reg.lan:5000/team/m:q4") == ModelName("reg.lan:5000", "team", "m", "q4")
    assert ModelName.parse("reg.lan/team_1/m.v2:q4.1") == ModelName("reg.lan", "team_1", "m.v2", "q4.1")
    # what Ollama refuses (types/model/name.go isValidPart): a `.` in a namespace, anything but ASCII
    for hostile in ("deepseek-r1:../../../../etc/x", "a/../b:c", "deepseek-r1:a/b", "/x:y", "m:",
                    "team.x/m:q4", "reg.lan/team.x/m:q4", "modèle:q4", "team/m:q４"):
        with pytest.raises(R1FleetError):
            ModelName.parse(hostile)


@needs_root
def test_leftovers_in_incoming_never_replace_a_stored_blob(published, tmp_path, monkeypatch):
    """A blob the store holds whole stays as it is, whatever an interrupted run or another tag left in the
    incoming directory: that is removed, never moved into the store."""
    store = tmp_path / "ollama"
    place(fetch_of(published), store, monkeypatch)
    weights = store / "blobs" / f"sha256-{published['sha']}"
    good = weights.read_bytes()
    (store / "manifests/registry.ollama.ai/r1fleet/smollm2/135m-instruct-q4_1").unlink()  # the tag is gone
    incoming = store / ".r1fleet-incoming"
    incoming.mkdir()
    (incoming / f"sha256-{published['sha']}").write_bytes(good[:100])  # a partial of a blob the store has
    (incoming / f"sha256-{'ab' * 32}").write_bytes(b"left by another tag")
    _, result = place(fetch_of(published), store, monkeypatch)
    assert result.returncode == 0, result.stderr
    assert weights.read_bytes() == good and not (store / "blobs" / f"sha256-{'ab' * 32}").exists()
    assert not incoming.exists()
