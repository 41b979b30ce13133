#!/usr/bin/env python3
"""Build the STAND-IN Ollama release archives for r1fleet's lab and tests.

    python build.py OUTDIR [--version 0.32.15-standin]

Writes OUTDIR/ollama-linux-amd64.tgz and ollama-linux-arm64.tgz (same content: the stand-in is a
Python script), OUTDIR/sha256sum.txt and OUTDIR/VERSION. The layout follows Ollama's release
workflow (.github/workflows/release.yaml, linux-build job): a gzip tar of `bin/ollama` and
`lib/ollama/*` with owner and group 0, and a sha256sum.txt written by `sha256sum` over `./<file>`
paths. Fixed mtimes, ownership, order and gzip header make the bytes (and so the sha256 r1fleet
pins) identical on every build.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import re
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARCHES = ("amd64", "arm64")
FIXED_MTIME = 1_700_000_000  # any constant: the archive must not depend on when it was built
README = """STAND-IN Ollama release for r1fleet's lab and tests (not the real Ollama).

No package registry reachable from r1fleet's build machines ships the Ollama binary, so this
archive has the real release layout (bin/ollama, lib/ollama/) with a Python stand-in as
bin/ollama. It ships no runner libraries: at run time the stand-in uses a real llama-server
found at lib/ollama/llama-server or on PATH, and otherwise answers with marked stand-in text.
"""


def stamped_script(version: str) -> bytes:
    source = (HERE / "ollama").read_text()
    stamped, count = re.subn(r'^VERSION = "[^"]*"', f'VERSION = "{version}"', source, count=1, flags=re.M)
    if count != 1:
        raise SystemExit("build.py: no VERSION line found in tests/standins/ollama/ollama")
    return stamped.encode()


def tar_member(name: str, data: bytes, mode: int) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info, io.BytesIO(data)


def archive(version: str) -> bytes:
    members = [("bin/ollama", stamped_script(version), 0o755),
               ("lib/ollama/README.txt", README.encode(), 0o644)]
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name, data, mode in members:
                tar.addfile(*tar_member(name, data, mode))
    return raw.getvalue()


def build(outdir: Path, version: str) -> dict[str, str]:
    """Write the archives, sha256sum.txt and VERSION; return {file name: sha256}."""
    if not re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z.+-]*", version):
        raise SystemExit(f"build.py: invalid --version {version!r}: use e.g. 0.32.15-standin")
    outdir.mkdir(parents=True, exist_ok=True)
    data = archive(version)
    sums = {}
    for arch in ARCHES:
        name = f"ollama-linux-{arch}.tgz"
        (outdir / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    (outdir / "sha256sum.txt").write_text("".join(f"{h}  ./{n}\n" for n, h in sorted(sums.items())))
    (outdir / "VERSION").write_text(version + "\n")
    return sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--version", default="0.32.15-standin")
    args = parser.parse_args()
    for name, digest in build(args.outdir, args.version).items():
        print(f"{digest}  {args.outdir / name}")


if __name__ == "__main__":
    main()
