"""The lab's base image: a Debian forky root built once with debootstrap and cached.

The cache key hashes the whole recipe (suite, package list, post-build script), so a
change to any of them builds a new image; an unchanged recipe reuses the cached one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from r1fleet.lab import paths

SUITE = "forky"
# bookworm's debootstrap has no forky script; the sid script works for testing (docs/research/lab-notes.md).
DEBOOTSTRAP_SCRIPT = "/usr/share/debootstrap/scripts/sid"
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "iproute2", "ca-certificates",
    "curl", "python3", "procps", "zstd", "xz-utils", "less",
    # Real Ollama (>= 0.30) runs llama.cpp's llama-server as its runner and ships it in lib/ollama;
    # the stand-in Ollama archive cannot ship that binary, so lab hosts carry Debian's, and the
    # stand-in runs it: Ollama hosts in the lab then generate for real, with real timings.
    "llama.cpp-tools",
    # The GPUs' stand-in: one ggml-rpc-server per simulated GPU gives llama-server a real llama.cpp
    # device for each (CPU-backed), so a tensor split is placed, allocated and logged by llama.cpp itself.
    "llama.cpp-tools-extra", "libggml0-backend-rpc",
)

# Runs inside the new root (chroot). Host-specific files are written per host at `up`.
_POST_BUILD = r"""
set -eu
# Each host gets its own ssh host key and machine id at `up`.
rm -f /etc/ssh/ssh_host_*
: > /etc/machine-id
# forky's Release file is past its Valid-Until date on the registry this lab reaches.
printf 'Acquire::Check-Valid-Until "false";\n' > /etc/apt/apt.conf.d/80r1lab-valid-until
cat > /etc/apt/sources.list <<'SRC'
deb http://deb.debian.org/debian forky main contrib
SRC
# Simulated RAM: nspawn cannot bind over /proc/meminfo, a mount inside the booted
# container can (docs/research/lab-notes.md). The data file is written per host at `up`.
cat > /etc/systemd/system/r1lab-meminfo.service <<'UNIT'
[Unit]
Description=r1fleet lab: simulated /proc/meminfo of this host's profile
DefaultDependencies=no
ConditionPathExists=/etc/r1fleet-lab/meminfo
Before=sysinit.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/mount --bind /etc/r1fleet-lab/meminfo /proc/meminfo

[Install]
WantedBy=sysinit.target
UNIT
systemctl enable r1lab-meminfo.service
# Simulated GPUs as real llama.cpp devices: one ggml-rpc-server per line of gpus.conf, GPU N on
# 127.0.0.1:(GPU_RPC_BASE_PORT + N), reachable from inside this host only. STAND-IN for GPUs.
cat > /usr/local/sbin/r1lab-gpus <<'SCRIPT'
#!/bin/sh
# r1fleet lab STAND-IN: start one ggml-rpc-server (CPU backend) per simulated GPU of this host.
set -eu
server=$(ls /usr/libexec/*/llama/bin/ggml-rpc-server | head -n1)
grep '^[0-9]' /etc/r1fleet-lab/gpus.conf | cut -d'|' -f1 | while read -r index; do
    systemd-run --unit "r1lab-gpu$index" --description "r1fleet lab: stand-in for GPU $index (ggml-rpc-server)"         -p Restart=always "$server" -H 127.0.0.1 -p $((@GPU_RPC_BASE_PORT@ + index)) -t 1
done
SCRIPT
chmod 0755 /usr/local/sbin/r1lab-gpus
cat > /etc/systemd/system/r1lab-gpus.service <<'UNIT'
[Unit]
Description=r1fleet lab: the simulated GPUs as llama.cpp RPC devices
ConditionPathExists=/etc/r1fleet-lab/gpus.conf
After=network.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/r1lab-gpus

[Install]
WantedBy=multi-user.target
UNIT
systemctl enable r1lab-gpus.service
# No consoles to log in on in a container.
systemctl mask console-getty.service getty@tty1.service serial-getty@.service >/dev/null 2>&1 || true
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
"""
POST_BUILD = _POST_BUILD.replace("@GPU_RPC_BASE_PORT@", str(paths.GPU_RPC_BASE_PORT))


def recipe() -> dict:
    return {
        "suite": SUITE,
        "script": Path(DEBOOTSTRAP_SCRIPT).name,
        "variant": "minbase",
        "packages": sorted(PACKAGES),
        "post_build": POST_BUILD,
    }


def cache_key() -> str:
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:16]


def image_root() -> Path:
    return paths.IMAGES_DIR / cache_key() / "rootfs"


def is_cached() -> bool:
    return (image_root().parent / "complete").exists()


def controller_debian_mirror() -> str:
    """The Debian mirror this controller's apt already uses (the one known to be reachable)."""
    candidates = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]
    for source in candidates:
        if not source.exists():
            continue
        for line in source.read_text().splitlines():
            for word in line.replace("URIs:", " ").split():
                if word.startswith("http") and word.rstrip("/").endswith("/debian"):
                    return word.rstrip("/")
    return "http://deb.debian.org/debian"


def build(log_file: Path, proxy_url: str | None = None) -> Path:
    """Build the image unless cached; return its root. Old images are removed after success."""
    if is_cached():
        return image_root()
    final = image_root().parent
    work = final.with_name(final.name + ".building")
    shutil.rmtree(work, ignore_errors=True)
    (work / "rootfs").mkdir(parents=True)
    env = dict(os.environ)
    if proxy_url:
        env["http_proxy"] = proxy_url  # debootstrap's wget goes through the lab's apt cache
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        _run_logged(
            ["debootstrap", "--variant=minbase", "--components=main,contrib",
             "--include=" + ",".join(PACKAGES), SUITE, str(work / "rootfs"),
             controller_debian_mirror(), DEBOOTSTRAP_SCRIPT],
            log, env, "debootstrap",
        )
        _run_logged(["chroot", str(work / "rootfs"), "/bin/sh", "-c", POST_BUILD], log, env, "post-build")
    (work / "recipe.json").write_text(json.dumps(recipe(), indent=2))
    (work / "complete").touch()
    if final.exists():
        shutil.rmtree(final)
    work.rename(final)
    for old in paths.IMAGES_DIR.iterdir():
        if old != final and not old.name.endswith(".building"):
            shutil.rmtree(old, ignore_errors=True)
    return final / "rootfs"


def _run_logged(argv: list[str], log, env: dict, what: str) -> None:
    log.write(f"\n$ {' '.join(argv[:3])} ...\n".encode())
    log.flush()
    result = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise ImageError(f"image build failed in {what} (exit {result.returncode}); see {log.name}")


class ImageError(RuntimeError):
    pass


def remove_all() -> None:
    shutil.rmtree(paths.IMAGES_DIR, ignore_errors=True)
