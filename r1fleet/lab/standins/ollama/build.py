#!/usr/bin/env python3
"""Build the STAND-IN Ollama release archives for r1fleet's lab and tests.

    python build.py OUTDIR [--version 0.32.9]

Writes OUTDIR/ollama-linux-amd64.tar.zst and ollama-linux-arm64.tar.zst (same content: the stand-in is a
Python script), OUTDIR/sha256sum.txt and OUTDIR/VERSION. The layout follows Ollama's release workflow
(.github/workflows/release.yaml of v0.32.9): `tar c --owner 0 --group 0 | zstd -19` over the member list
bin/ollama, lib/ollama/llama-server, lib/ollama/llama-quantize, lib/ollama/cuda_v12/..., with no ./ prefix,
the CUDA runtime as a soname symlink chain (CMake's install of runtime dependencies); sha256sum.txt is
`sha256sum` over `./<file>` paths. Fixed mtimes, ownership and order make the bytes (and so the sha256
r1fleet pins) identical on every build.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARCHES = ("amd64", "arm64")
FIXED_MTIME = 1_700_000_000  # any constant: the archive must not depend on when it was built
README = """STAND-IN Ollama release for r1fleet's lab and tests (not the real Ollama).

No package registry reachable from r1fleet's build machines ships the Ollama binary, so this
archive has the real release layout with a Python stand-in as bin/ollama. lib/ollama/llama-server and
lib/ollama/llama-quantize are launchers for the lab host's own Debian llama.cpp builds (the real
archive ships llama.cpp's binaries there); lib/ollama/cuda_v12 holds marked placeholders only, so the
layout, its directories and its symlinks are real while nothing in it is a CUDA library.
"""
LAUNCHER = """#!/bin/sh
# STAND-IN (r1fleet lab): the real Ollama archive ships llama.cpp's {name} here; the lab host's
# Debian build (package llama.cpp-tools) runs instead.
exec /usr/bin/{name} "$@"
"""
PLACEHOLDER = b"STAND-IN placeholder for r1fleet's lab: not a shared library\n"
# (path, kind, data or link target, mode): regular files, then the symlinks CMake's install writes
MEMBERS_AFTER_BINARY = [
    ("lib/ollama/README.txt", "file", README.encode(), 0o644),
    ("lib/ollama/llama-server", "file", LAUNCHER.format(name="llama-server").encode(), 0o755),
    ("lib/ollama/llama-quantize", "file", LAUNCHER.format(name="llama-quantize").encode(), 0o755),
    ("lib/ollama/cuda_v12/libggml-cuda.so", "file", PLACEHOLDER, 0o644),
    ("lib/ollama/cuda_v12/libcudart.so.12.8.90", "file", PLACEHOLDER, 0o644),
    ("lib/ollama/cuda_v12/libcudart.so.12", "link", "libcudart.so.12.8.90", 0o777),
]


def stamped_script(version: str) -> bytes:
    source = (HERE / "ollama").read_text()
    stamped, count = re.subn(r'^VERSION = "[^"]*"', f'VERSION = "{version}"', source, count=1, flags=re.M)
    if count != 1:
        raise SystemExit("build.py: no VERSION line found in the stand-in ollama script")
    return stamped.encode()


def tar_member(name: str, kind: str, data: bytes | str, mode: int) -> tuple[tarfile.TarInfo, io.BytesIO | None]:
    info = tarfile.TarInfo(name)
    info.mode, info.mtime = mode, FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if kind == "link":
        info.type, info.linkname = tarfile.SYMTYPE, str(data)
        return info, None
    info.size = len(data)
    return info, io.BytesIO(data)


def archive(version: str) -> bytes:
    """The tar, zstd-compressed by the zstd tool as the release workflow does (level 19)."""
    members = [("bin/ollama", "file", stamped_script(version), 0o755), *MEMBERS_AFTER_BINARY]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            tar.addfile(*tar_member(*member))
    zstd = shutil.which("zstd")
    if not zstd:
        raise SystemExit("build.py: zstd is needed to pack the stand-in release (apt-get install zstd)")
    return subprocess.run([zstd, "-19", "-q", "-c"], input=raw.getvalue(), capture_output=True, check=True).stdout


def build(outdir: Path, version: str) -> dict[str, str]:
    """Write the archives, sha256sum.txt and VERSION; return {file name: sha256}."""
    if not re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z.+-]*", version):
        raise SystemExit(f"build.py: invalid --version {version!r}: use e.g. 0.32.15-standin")
    outdir.mkdir(parents=True, exist_ok=True)
    data = archive(version)
    sums = {}
    for arch in ARCHES:
        name = f"ollama-linux-{arch}.tar.zst"
        (outdir / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    (outdir / "sha256sum.txt").write_text("".join(f"{h}  ./{n}\n" for n, h in sorted(sums.items())))
    (outdir / "VERSION").write_text(version + "\n")
    return sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--version", default="0.32.9")
    args = parser.parse_args()
    for name, digest in build(args.outdir, args.version).items():
        print(f"{digest}  {args.outdir / name}")


if __name__ == "__main__":
    main()
