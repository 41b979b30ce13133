"""The host sections of the probe: OS, memory, CPU, disk, own processes, model files, Secure Boot, sysctl."""

from __future__ import annotations

import re
from dataclasses import dataclass

from r1fleet.errors import ProbeError
from r1fleet.hardware._base import probe_fix
from r1fleet.records import INSTALL_ROOT, DiskSpace, GpuProcess, LlamaCppApt, OsInfo, PackageVersions, is_debian_version

# ---------------------------------------------------------------------------------------------
# System: uname, os-release, meminfo, cpu, df, secureboot, sysctl


def parse_uname(lines: list[str]) -> OsInfo:
    fields = " ".join(lines).split()
    system = fields[0] if fields else "Linux"
    kernel = fields[1] if len(fields) > 1 else ""
    arch = fields[-1] if len(fields) > 2 else ""
    return OsInfo(system=system, kernel=kernel, arch=arch)


def parse_os_release(lines: list[str], base: OsInfo) -> OsInfo:
    values: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip('"').strip("'")
    return base.model_copy(update={
        "id": values.get("ID", ""),
        "version_id": values.get("VERSION_ID", ""),
        "codename": values.get("VERSION_CODENAME", ""),
        "pretty_name": values.get("PRETTY_NAME", ""),
    })


def parse_init(lines: list[str]) -> str:
    """What runs the host: "systemd", else PID 1's name ("" when the probe could not tell, e.g. on macOS).

    >>> parse_init(["systemd"]), parse_init(["bash"]), parse_init([])
    ('systemd', 'bash', '')
    """
    words = "".join(lines).split()
    return words[0][:32] if words and words[0].isprintable() else ""


def parse_meminfo(lines: list[str], host: str) -> tuple[int, int | None] | None:
    """(MemTotal, MemAvailable) in MiB; None when the section is empty; ProbeError when garbled."""
    if not any(line.strip() for line in lines):
        return None
    values: dict[str, int] = {}
    for line in lines:
        match = re.match(r"^\s*([A-Za-z0-9_()]+):\s+([0-9]+)\s*(kB)?\s*$", line)
        if match:
            values[match.group(1)] = int(match.group(2))
    total = values.get("MemTotal")
    if not total:
        raise ProbeError(
            "the meminfo section has no readable `MemTotal: N kB` line",
            host=host, field="meminfo", fix=probe_fix(host),
        )
    available = values.get("MemAvailable")
    return total // 1024, (available // 1024 if available is not None else None)


@dataclass(frozen=True)
class CpuInfo:
    count: int = 1
    name: str = ""
    avx2: bool = False
    avx512: bool = False


def parse_cpu(lines: list[str]) -> CpuInfo:
    count, name, flags = 1, "", set()
    for line in lines:
        text = line.strip()
        if text.isdecimal():
            count = max(1, int(text))
        key, sep, value = text.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "model name" and not name:
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return CpuInfo(count=count, name=name, avx2="avx2" in flags, avx512="avx512f" in flags)


def parse_df(lines: list[str]) -> int | None:
    """Free space in MiB from `df -Pk` (header, then one line: fs, blocks, used, available, ...)."""
    for line in lines[1:]:
        fields = line.split()
        if len(fields) >= 4 and fields[3].isdecimal():
            return int(fields[3]) // 1024
    return None


def parse_disk(lines: list[str]) -> DiskSpace | None:
    """The filesystem from `df -Pk` (header, then: fs, blocks, used, available, capacity, mount point)."""
    for line in lines[1:]:
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[3].isdecimal() and fields[5].startswith("/"):
            return DiskSpace(mount=fields[5].strip(), free_mib=int(fields[3]) // 1024)
    return None


def parse_installed_releases(lines: list[str]) -> list[str]:
    """The install stamps of Ollama releases (`<root>/<version>/.r1fleet-installed-<digest>`), one path a line."""
    stamp = re.escape(INSTALL_ROOT) + r"/ollama/[^/\s]+/\.r1fleet-installed-[0-9a-f]+"
    return [line.strip() for line in lines if re.fullmatch(stamp, line.strip())]


# Before the probe listed r1fleet's own service processes, they were known by name only.
OWN_BACKEND_NAMES = ("ollama", "llama-server", "llama_server")


def parse_own_pids(lines: list[str]) -> set[int]:
    return {int(line.strip()) for line in lines if line.strip().isdecimal()}


def own_process(process: GpuProcess, own_pids: set[int] | None) -> bool:
    """r1fleet's own service: by its cgroup's processes, or (older probes) by the backend's name."""
    if own_pids is not None:
        return process.pid in own_pids
    return any(marker in process.name.lower() for marker in OWN_BACKEND_NAMES)


def parse_model_files(lines: list[str]) -> dict[str, int]:
    """{file name: bytes} from `ls -ln` lines (mode, links, uid, gid, size, date..., path)."""
    files: dict[str, int] = {}
    for line in lines:
        fields = line.split()
        if len(fields) >= 9 and fields[0].startswith("-") and fields[4].isdecimal():
            files[fields[-1].rsplit("/", 1)[-1]] = int(fields[4])
    return files


def parse_apt_policy(lines: list[str], package: str = "haproxy") -> PackageVersions | None:
    """`apt-cache policy PACKAGE`: its installed and candidate versions (None: `(none)`, not installed or apt has
    none); None without the package's lines (no apt, or no such package)."""
    versions = apt_policy(lines).get(package)
    return PackageVersions(installed=versions[0], candidate=versions[1]) if versions else None


def parse_secureboot(lines: list[str]) -> bool | None:
    text = " ".join(lines).lower()
    if "secureboot enabled" in text:
        return True
    if "secureboot disabled" in text:
        return False
    return None


def parse_sysctl(lines: list[str]) -> dict[str, str]:
    """`key: value` lines (macOS sysctl) as a dict."""
    values: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip() and " " not in key.strip():
            values[key.strip()] = value.strip()
    return values





def apt_policy(output: list[str]) -> dict[str, tuple[str | None, str | None]]:
    """`LC_ALL=C apt-cache policy PKG...` read as {package: (installed version, candidate version)}, None for
    `(none)` or a version outside Debian's syntax; a package apt does not know is absent."""
    found: dict[str, tuple[str | None, str | None]] = {}
    current = None
    for line in output:
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
            found[current] = (None, None)
        elif current and line.strip().startswith(("Installed:", "Candidate:")):
            key, value = (part.strip() for part in line.split(":", 1))
            version = value if is_debian_version(value) else None
            installed, candidate = found[current]
            found[current] = (version, candidate) if key == "Installed" else (installed, version)
    return found


def parse_llama_cpp_apt(lines: list[str]) -> LlamaCppApt | None:
    """The probe's llama-cpp-packages section (`lists: present|absent`, then apt-cache policy); None when empty
    (no apt on the host)."""
    if not any(line.strip() for line in lines):
        return None
    policy = apt_policy(lines)
    return LlamaCppApt(lists=any(line.strip() == "lists: present" for line in lines),
                       installed={p: i for p, (i, _c) in policy.items() if i},
                       candidates={p: c for p, (_i, c) in policy.items() if c})
