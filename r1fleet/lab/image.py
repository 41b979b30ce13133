"""The lab's base images: a Debian root per suite (forky by default; trixie, bookworm), each built once
with debootstrap and cached.

The cache key hashes the whole recipe (suite, package list, post-build script), so a
change to any of them builds a new image; an unchanged recipe reuses the cached one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from r1fleet.lab import paths

# Every lab host's Debian release: forky (testing, the default) carries Debian's llama.cpp; bookworm (12) and
# trixie (13) are the releases most home labs run, with older systemd and nftables and no llama.cpp package.
DEFAULT_SUITE = "forky"
# bookworm's debootstrap has no forky script; the sid script works for testing (docs/research/lab-notes.md),
# and bookworm's own `bookworm` and `trixie` scripts are links to it.
DEBOOTSTRAP_SCRIPT = "/usr/share/debootstrap/scripts/sid"
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "iproute2", "ca-certificates",
    "curl", "python3", "procps", "zstd", "xz-utils", "less",
)
LLAMA_CPP_PACKAGES = (
    # Real Ollama (>= 0.30) runs llama.cpp's llama-server as its runner and ships it in lib/ollama;
    # the stand-in Ollama archive cannot ship that binary, so lab hosts carry Debian's, and the
    # stand-in runs it: Ollama hosts in the lab then generate for real, with real timings.
    "llama.cpp-tools",
    # The GPUs' stand-in: one ggml-rpc-server per simulated GPU gives llama-server a real llama.cpp
    # device for each (CPU-backed), so a tensor split is placed, allocated and logged by llama.cpp itself.
    "llama.cpp-tools-extra", "libggml0-backend-rpc",
)
PACKAGES = BASE_PACKAGES + LLAMA_CPP_PACKAGES  # forky's


@dataclass(frozen=True)
class Suite:
    """What differs between the lab's Debian releases."""

    name: str
    packages: tuple[str, ...]
    # The suite has no llama.cpp package: forky's build is carried in with its own loader and libraries (below).
    carries_llama_cpp: bool
    # The registry's Release file of the suite is past its Valid-Until date (forky's, docs/research/lab-notes.md).
    stale_release: bool


SUITES = {
    "forky": Suite("forky", PACKAGES, carries_llama_cpp=False, stale_release=True),
    "trixie": Suite("trixie", BASE_PACKAGES, carries_llama_cpp=True, stale_release=False),
    "bookworm": Suite("bookworm", BASE_PACKAGES, carries_llama_cpp=True, stale_release=False),
}

# STAND-IN (lab only) for what the lab's stand-ins run on a suite without llama.cpp: the stand-in Ollama archive's
# lib/ollama/llama-server and llama-quantize launch /usr/bin/<tool>, and a simulated GPU is Debian's
# ggml-rpc-server. forky's builds need its glibc (2.43), so they are carried with forky's loader and the libraries
# `ldd` lists, and each tool at its Debian path is a launcher that runs it through that loader. Real hosts on these
# releases take llama-server from the Ollama archive instead (r1fleet/artifacts/llama_cpp_install.py).
CARRIED_DIR = "/opt/r1lab-llama.cpp"
CARRIED_TOOLS = (  # their paths in forky, where each gets its launcher in the carrying image
    "/usr/bin/llama-server", "/usr/bin/llama-quantize", "/usr/libexec/x86_64-linux-gnu/llama/bin/ggml-rpc-server",
)
# ggml loads its CPU (and RPC) backends from the directory Debian compiled in, so they keep that path.
GGML_BACKENDS_DIR = "/usr/lib/x86_64-linux-gnu/ggml/backends0"
LOADER = "ld-linux-x86-64.so.2"
CARRIED_LAUNCHER = """#!/bin/sh
# r1fleet lab STAND-IN: Debian forky's {tool}, carried with forky's loader and libraries into a Debian {suite}
# lab host (r1fleet/lab/image.py); {suite} has no llama.cpp package.
exec {carried}/lib/{loader} --library-path {carried}/lib {carried}/bin/{name} "$@"
"""

# Runs inside the new root (chroot), put together per suite from these parts. Host-specific files are
# written per host at `up`.
_HEAD = r"""
set -eu
# Each host gets its own ssh host key and machine id at `up`.
rm -f /etc/ssh/ssh_host_*
: > /etc/machine-id
"""
_STALE_RELEASE = r"""# forky's Release file is past its Valid-Until date on the registry this lab reaches.
printf 'Acquire::Check-Valid-Until "false";\n' > /etc/apt/apt.conf.d/80r1lab-valid-until
"""
_SOURCES = r"""cat > /etc/apt/sources.list <<'SRC'
deb http://deb.debian.org/debian @SUITE@ main contrib
SRC
"""
_MEMINFO = r"""# Simulated RAM: nspawn cannot bind over /proc/meminfo, a mount inside the booted
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
"""
_GPU_STANDINS = r"""# Simulated GPUs as real llama.cpp devices: one ggml-rpc-server per line of gpus.conf, GPU N on
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
"""
_TAIL = r"""# No consoles to log in on in a container.
systemctl mask console-getty.service getty@tty1.service serial-getty@.service >/dev/null 2>&1 || true
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
"""


def post_build(suite: str = DEFAULT_SUITE) -> str:
    release = SUITES[suite]
    script = (_HEAD + (_STALE_RELEASE if release.stale_release else "") + _SOURCES.replace("@SUITE@", suite)
              + _MEMINFO + _GPU_STANDINS + _TAIL)
    return script.replace("@GPU_RPC_BASE_PORT@", str(paths.GPU_RPC_BASE_PORT))



def recipe(suite: str = DEFAULT_SUITE) -> dict:
    carried = {}
    if SUITES[suite].carries_llama_cpp:
        # The carried build is the forky image's, so this image follows that one's recipe too.
        carried = {"carried_llama_cpp": {"from": cache_key(DEFAULT_SUITE), "tools": CARRIED_TOOLS,
                                         "backends": GGML_BACKENDS_DIR, "launcher": CARRIED_LAUNCHER}}
    return {
        "suite": suite,
        "script": Path(DEBOOTSTRAP_SCRIPT).name,
        "variant": "minbase",
        "packages": sorted(SUITES[suite].packages),
        "post_build": post_build(suite),
        **carried,
    }


def cache_key(suite: str = DEFAULT_SUITE) -> str:
    return hashlib.sha256(json.dumps(recipe(suite), sort_keys=True).encode()).hexdigest()[:16]


def image_root(suite: str = DEFAULT_SUITE) -> Path:
    return paths.IMAGES_DIR / cache_key(suite) / "rootfs"


def is_cached(suite: str = DEFAULT_SUITE) -> bool:
    return (image_root(suite).parent / "complete").exists()


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


def build(log_file: Path, proxy_url: str | None = None, suite: str = DEFAULT_SUITE) -> Path:
    """Build the suite's image unless cached; return its root. After success, the suite's older images go,
    unless a lab host still runs on one (another checkout's lab, on its own recipe)."""
    if is_cached(suite):
        return image_root(suite)
    source = build(log_file, proxy_url) if SUITES[suite].carries_llama_cpp else None
    final = image_root(suite).parent
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
             "--include=" + ",".join(SUITES[suite].packages), suite, str(work / "rootfs"),
             controller_debian_mirror(), DEBOOTSTRAP_SCRIPT],
            log, env, "debootstrap",
        )
        _run_logged(["chroot", str(work / "rootfs"), "/bin/sh", "-c", post_build(suite)], log, env, "post-build")
        if source is not None:
            carry_llama_cpp(source, work / "rootfs", suite)
    (work / "recipe.json").write_text(json.dumps(recipe(suite), indent=2))
    (work / "complete").touch()
    if final.exists():
        shutil.rmtree(final)
    work.rename(final)
    in_use = lower_dirs()
    for old in paths.IMAGES_DIR.iterdir():
        if (old != final and not old.name.endswith(".building") and image_suite(old) == suite
                and str(old / "rootfs") not in in_use):
            shutil.rmtree(old, ignore_errors=True)
    return final / "rootfs"


def carry_llama_cpp(source: Path, target: Path, suite: str) -> None:
    """forky's llama.cpp tools, its ggml backends and every library they load (as `ldd` in forky lists them, its
    loader included) into TARGET, with a launcher at each tool's Debian path."""
    backends = sorted((source / GGML_BACKENDS_DIR.lstrip("/")).glob("*.so"))
    elves = [*CARRIED_TOOLS, *(f"{GGML_BACKENDS_DIR}/{b.name}" for b in backends)]
    listed = subprocess.run(["chroot", str(source), "ldd", *elves], capture_output=True, text=True)
    if listed.returncode != 0:
        raise ImageError(f"image build failed listing forky's llama.cpp libraries: {listed.stderr.strip()[-300:]}")
    libraries = set()
    for line in listed.stdout.splitlines():
        words = line.split()
        if "=>" in words and len(words) > words.index("=>") + 1 and words[words.index("=>") + 1].startswith("/"):
            libraries.add(words[words.index("=>") + 1])
        elif words and words[0].startswith("/") and words[0].endswith(LOADER):
            libraries.add(words[0])
    carried = target / CARRIED_DIR.lstrip("/")
    (carried / "lib").mkdir(parents=True)
    (carried / "bin").mkdir()
    for library in sorted(libraries):
        shutil.copy2(source / library.lstrip("/"), carried / "lib" / Path(library).name, follow_symlinks=True)
    (target / GGML_BACKENDS_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for backend in backends:
        shutil.copy2(backend, target / GGML_BACKENDS_DIR.lstrip("/") / backend.name)
    for tool in CARRIED_TOOLS:
        name = Path(tool).name
        shutil.copy2(source / tool.lstrip("/"), carried / "bin" / name, follow_symlinks=True)
        launcher = target / tool.lstrip("/")
        launcher.parent.mkdir(parents=True, exist_ok=True)
        launcher.write_text(CARRIED_LAUNCHER.format(tool=tool, suite=suite, carried=CARRIED_DIR, loader=LOADER,
                                                    name=name))
        launcher.chmod(0o755)


def image_suite(image_dir: Path) -> str | None:
    """The suite a cached image was built for (its recipe.json), None when unreadable."""
    try:
        return json.loads((image_dir / "recipe.json").read_text()).get("suite")
    except (OSError, ValueError, AttributeError):
        return None


def lower_dirs() -> set[str]:
    """The overlay lower directories mounted on this machine: the images lab hosts run on now."""
    found = set()
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[2] == "overlay":
            for option in fields[3].split(","):
                if option.startswith("lowerdir="):
                    found.update(option.removeprefix("lowerdir=").split(":"))
    return found


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
