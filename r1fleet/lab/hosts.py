"""One lab host: an overlay over the base image, booted with systemd-nspawn in its netns."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from r1fleet.lab import paths, procs, profiles


@dataclass(frozen=True)
class HostSpec:
    name: str
    profile: str
    address: str
    controller: str
    prefix: int


class HostError(RuntimeError):
    pass


def upper_dir(name: str) -> Path:
    return paths.HOSTS_DIR / name


def is_mounted(path: Path) -> bool:
    return str(path) in mounted_lab_roots()


def mounted_lab_roots() -> list[str]:
    """Mount points under the lab's roots dir, deepest first (for unmounting)."""
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point == str(paths.ROOTS_DIR) or point.startswith(str(paths.ROOTS_DIR) + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def mount_root(spec: HostSpec, image_root: Path) -> Path:
    root = paths.root_dir(spec.name)
    unmount_root(spec.name)
    shutil.rmtree(upper_dir(spec.name), ignore_errors=True)
    for sub in ("upper", "work"):
        (upper_dir(spec.name) / sub).mkdir(parents=True)
    root.mkdir(parents=True, exist_ok=True)
    options = (f"lowerdir={image_root},upperdir={upper_dir(spec.name) / 'upper'},"
               f"workdir={upper_dir(spec.name) / 'work'}")
    result = subprocess.run(["mount", "-t", "overlay", f"r1lab-{spec.name}", "-o", options, str(root)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise HostError(f"{spec.name}: overlay mount failed: {result.stderr.strip()}")
    return root


def unmount_root(name: str) -> None:
    root = str(paths.root_dir(name))
    for point in mounted_lab_roots():
        if point == root or point.startswith(root + "/"):
            subprocess.run(["umount", "-l", point], capture_output=True)


def host_key(name: str) -> Path:
    """The host's own ssh host key, generated once and kept so known_hosts stays valid."""
    key = paths.HOST_KEYS_DIR / name / "ssh_host_ed25519_key"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{name}", "-f", str(key)],
                       check=True, capture_output=True)
    return key


def write_host_files(root: Path, spec: HostSpec, all_hosts: dict[str, str], client_pubkey: str) -> None:
    profile = profiles.load(spec.profile)
    hosts_lines = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{spec.name}", f"{spec.controller}\tr1lab-controller"]
    hosts_lines += [f"{addr}\t{name}" for name, addr in all_hosts.items() if name != spec.name]
    key = host_key(spec.name)
    files: dict[str, tuple[str, int]] = {
        "etc/hostname": (spec.name + "\n", 0o644),
        "etc/hosts": ("\n".join(hosts_lines) + "\n", 0o644),
        "etc/machine-id": (hashlib.md5(f"r1lab:{spec.name}".encode()).hexdigest() + "\n", 0o444),
        "etc/resolv.conf": ("# r1fleet lab: no DNS; lab hosts reach only the controller\n", 0o644),
        "etc/apt/apt.conf.d/01r1lab-proxy": (
            f'Acquire::http::Proxy "http://{spec.controller}:{paths.PROXY_PORT}";\n', 0o644),
        "etc/ssh/sshd_config.d/r1lab.conf": ("HostKey /etc/ssh/ssh_host_ed25519_key\n", 0o644),
        "etc/ssh/ssh_host_ed25519_key": (key.read_text(), 0o600),
        "etc/ssh/ssh_host_ed25519_key.pub": (key.with_suffix(".pub").read_text(), 0o644),
        "root/.ssh/authorized_keys": (client_pubkey, 0o600),
        "etc/r1fleet-lab/profile": (spec.profile + "\n", 0o644),
        **profiles.host_files(profile),
    }
    for rel, (content, mode) in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        # Created with its final mode: a private key is never readable by others, not even for a moment.
        target.unlink(missing_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
        os.chmod(target, mode)  # the umask may have narrowed it
    os.chmod(root / "root" / ".ssh", 0o700)


def console_log(name: str) -> Path:
    return paths.LOG_DIR / f"{name}.console.log"


def nspawn_marker(name: str) -> str:
    return str(paths.root_dir(name))


def boot(spec: HostSpec, root: Path) -> int:
    env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")  # forky's systemd refuses cgroup v1
    argv = ["systemd-nspawn", "-q", "-D", str(root), "-M", spec.name, "-b", "--register=no",
            "--keep-unit", f"--network-namespace-path=/run/netns/{paths.netns_name(spec.name)}",
            "--resolv-conf=off", "--timezone=off", "--link-journal=no", "--console=read-only",
            # nftables in the host (LAN exposure) needs it; it acts on the host's own namespace only.
            "--capability=CAP_NET_ADMIN"]
    return procs.start(argv, console_log(spec.name), env=env)


def ssh_argv(name: str, *command: str, timeout: int = 3) -> list[str]:
    return ["ssh", "-F", str(paths.SSH_CONFIG), "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}",
            name, *command]


def wait_ready(names_pids: dict[str, int], timeout: float = 90.0) -> dict[str, str]:
    """Wait until every host answers over SSH with a finished boot; return errors by host."""
    pending = dict(names_pids)
    errors: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for name, pid in list(pending.items()):
            if procs.exited(pid):
                errors[name] = "systemd-nspawn exited during boot"
                del pending[name]
                continue
            result = subprocess.run(ssh_argv(name, "systemctl", "is-system-running", "--wait"),
                                    capture_output=True, text=True, timeout=60)
            state = result.stdout.strip()
            if state == "degraded":
                state = retry_failed_units(name)
            if state in ("running", "degraded"):
                if state == "degraded":
                    failed = subprocess.run(ssh_argv(name, "systemctl", "--failed", "--no-legend"),
                                            capture_output=True, text=True).stdout.strip()
                    errors[name] = f"booted degraded; failed units: {failed}"
                del pending[name]
        if pending:
            time.sleep(0.3)
    for name in pending:
        errors[name] = f"not reachable over SSH within {int(timeout)} s"
    return errors


def retry_failed_units(name: str) -> str:
    """Start units that failed during boot once more; return the system state afterwards.

    On this controller (cgroup v1 hybrid, several containers booting at once) systemd in a
    container now and then fails a unit with "Failed to spawn executor: No such file or
    directory" (result 'resources'); started again, the unit succeeds.
    """
    script = ("units=$(systemctl --failed --plain --no-legend | awk '{print $1}'); "
              "[ -n \"$units\" ] && systemctl reset-failed $units && systemctl restart $units; "
              "systemctl is-system-running")
    result = subprocess.run(ssh_argv(name, script), capture_output=True, text=True, timeout=60)
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "unknown"


def log_tail(name: str, lines: int = 30) -> str:
    try:
        text = console_log(name).read_text(errors="replace")
    except OSError:
        return "(no console log)"
    return "\n".join(text.splitlines()[-lines:])
