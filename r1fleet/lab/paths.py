"""Where the lab keeps its files, and the names it gives kernel objects.

Everything the lab creates carries one of these prefixes, so `lab down` and crash
recovery can find exactly what the lab made and nothing else.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
LAB_FLEET_FILE = PACKAGE_DIR / "lab.yml"  # inventory/lab.yml links here: it ships with the package
PROFILES_DIR = PACKAGE_DIR / "profiles"
STANDINS_DIR = PACKAGE_DIR / "standins"

# Cached, survives `lab down`: the base image, downloaded wheels, per-host ssh host keys.
CACHE_DIR = Path("/var/lib/r1fleet-lab")
IMAGES_DIR = CACHE_DIR / "images"
DOWNLOADS_DIR = CACHE_DIR / "downloads"
HOST_KEYS_DIR = CACHE_DIR / "host-keys"
# Per-host overlay upper dirs (on disk: apt installs land there); wiped by `lab down`.
HOSTS_DIR = CACHE_DIR / "hosts"

# Runtime state, removed by `lab down`.
RUN_DIR = Path("/run/r1fleet-lab")
STATE_FILE = RUN_DIR / "state.json"
SSH_KEY = RUN_DIR / "id_ed25519"
SSH_CONFIG = RUN_DIR / "ssh_config"
KNOWN_HOSTS = RUN_DIR / "known_hosts"
MIRROR_DIR = RUN_DIR / "mirror"
MIRROR_COUNTS = RUN_DIR / "mirror-stats" / "served.json"  # bytes served per file (lab status --json)
LOG_DIR = RUN_DIR / "logs"
PROXY_DIR = RUN_DIR / "apt-cacher-ng"
ROOTS_DIR = RUN_DIR / "roots"

BRIDGE = "r1lab0"
NETNS_PREFIX = "r1lab-"
VETH_PREFIX = "r1lv"
MIRROR_PORT = 8088
PROXY_PORT = 3142
# Each simulated GPU N of a lab host is a real llama.cpp device: ggml-rpc-server on 127.0.0.1:(base + N)
# inside that host (image.py starts them; the deploy points llama-server's --rpc at them).
GPU_RPC_BASE_PORT = 50100


def netns_name(host: str) -> str:
    return f"{NETNS_PREFIX}{host}"


def veth_name(host: str) -> str:
    """Controller-side veth name: interface names are limited to 15 bytes, host names are not."""
    import hashlib

    return VETH_PREFIX + hashlib.sha256(host.encode()).hexdigest()[:10]


def root_dir(host: str) -> Path:
    return ROOTS_DIR / host
