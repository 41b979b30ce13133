"""`lab up` and `lab down`: bring the lab to a known state, whatever was left before."""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from r1fleet.lab import (
    hosts,
    image,
    mirror,
    network,
    paths,
    procs,
    profiles,
    proxy,
    state,
)
from r1fleet.lab.hosts import HostSpec

Say = Callable[[str], None]


class LabError(RuntimeError):
    pass


@contextmanager
def locked():
    paths.RUN_DIR.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.RUN_DIR, 0o755)
    with (paths.RUN_DIR / "lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LabError("another `r1fleet lab` command is running; wait for it to finish") from None
        yield


def ensure_client_key() -> str:
    if not paths.SSH_KEY.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "r1fleet-lab",
                        "-f", str(paths.SSH_KEY)], check=True, capture_output=True)
    os.chmod(paths.SSH_KEY, 0o600)
    return paths.SSH_KEY.with_suffix(".pub").read_text()


def write_ssh_files(addresses: dict[str, str]) -> None:
    known, config = [], ["# r1fleet lab: `ssh -F " + str(paths.SSH_CONFIG) + " HOST`\n"]
    for name, address in addresses.items():
        pub = hosts.host_key(name).with_suffix(".pub").read_text().split()
        known.append(f"{name},{address} {pub[0]} {pub[1]}")
        config.append(
            f"Host {name}\n  HostName {address}\n  User root\n  IdentityFile {paths.SSH_KEY}\n"
            f"  IdentitiesOnly yes\n  UserKnownHostsFile {paths.KNOWN_HOSTS}\n"
            "  StrictHostKeyChecking yes\n  LogLevel ERROR\n")
    paths.KNOWN_HOSTS.write_text("\n".join(known) + "\n")
    paths.SSH_CONFIG.write_text("\n".join(config))


def stop_processes(pids: list[int], marker: str, timeout: float = 30.0) -> None:
    """SIGTERM all at once (containers shut down in parallel), then wait; SIGKILL stragglers.

    SIGTERM is repeated every 2 s: nspawn turns each into a halt request for the container's
    systemd, which drops requests that arrive before it has set up its signal handlers (a
    container still booting, e.g. on Ctrl-C during `lab up`).
    """
    live = [pid for pid in pids if procs.is_ours(pid, marker)]
    deadline = time.monotonic() + timeout
    next_term = 0.0
    while live and time.monotonic() < deadline:
        if time.monotonic() >= next_term:
            for pid in live:
                os.kill(pid, signal.SIGTERM)
            next_term = time.monotonic() + 2.0
        time.sleep(0.1)
        live = [pid for pid in live if not procs.exited(pid) and procs.is_ours(pid, marker)]
    for pid in live:
        procs.stop(pid, marker, timeout=0)


def remove_hosts(names: list[str], pids: list[int]) -> None:
    stop_processes(pids, str(paths.ROOTS_DIR))
    for name in names:
        hosts.unmount_root(name)
        network.remove_host_net(name)
        shutil.rmtree(hosts.upper_dir(name), ignore_errors=True)
        if not hosts.is_mounted(paths.root_dir(name)):
            shutil.rmtree(paths.root_dir(name), ignore_errors=True)


def clean_stale(keep: set[str], lab_state: dict) -> None:
    """Remove every lab host object (process, mount, netns, veth) not belonging to KEEP."""
    keep_pids = {lab_state["hosts"][n]["pid"] for n in keep}
    stray = [pid for pid in procs.find(str(paths.ROOTS_DIR), "systemd-nspawn") if pid not in keep_pids]
    stop_processes(stray, str(paths.ROOTS_DIR))
    keep_roots = [str(paths.root_dir(n)) for n in keep]
    for point in hosts.mounted_lab_roots():
        if not any(point == r or point.startswith(r + "/") for r in keep_roots) and point != str(paths.ROOTS_DIR):
            subprocess.run(["umount", "-l", point], capture_output=True)
    keep_ns = {paths.netns_name(n) for n in keep}
    for ns in network.lab_netns():
        if ns not in keep_ns:
            network.ip("netns", "del", ns, check=False)
    keep_links = {paths.veth_name(n) for n in keep} | {paths.BRIDGE}
    for link in network.lab_links():
        if link not in keep_links:
            network.ip("link", "del", link, check=False)


def ensure_service(lab_state: dict, key: str, marker: str, program: str, start: Callable[[], int]) -> None:
    if procs.is_ours(lab_state.get(key), marker):
        return
    stop_processes(procs.find(marker, program), marker)
    lab_state[key] = start()
    state.save_state(lab_state)


def up(fleet_path: Path, only: list[str] | None, say: Say) -> int:
    fleet = state.read_lab_layout(fleet_path)
    controller, addresses, prefix = fleet.addresses()
    wanted = [n for n in fleet.hosts if not only or n in only]
    unknown = sorted(set(only or []) - set(fleet.hosts))
    if unknown:
        raise LabError(f"--hosts: {', '.join(unknown)} not in {fleet_path}; hosts there: {', '.join(fleet.hosts)}")
    for name in wanted:
        profiles.load(fleet.hosts[name])  # fail before touching anything
    with locked():
        lab_state = state.load_state()
        if lab_state.get("controller") not in (None, controller):
            raise LabError(f"the lab is up on another subnet ({lab_state['controller']}); run `r1fleet lab down` first")
        lab_state.update(controller=controller, fleet_file=str(fleet.path))
        records = lab_state.setdefault("hosts", {})
        keep = {n for n in wanted if state.host_is_up(n, records.get(n))
                and records[n].get("address") == addresses[n] and records[n].get("profile") == fleet.hosts[n]
                and records[n].get("distro", state.DEFAULT_DISTRO) == fleet.distro(n)}
        keep |= {n for n, rec in records.items() if n not in wanted and n in fleet.hosts
                 and state.host_is_up(n, rec) and rec.get("address") == addresses[n]}
        for name in list(records):
            if name not in keep:
                del records[name]
        clean_stale(keep, lab_state)
        state.save_state(lab_state)
        pubkey = ensure_client_key()

        network.ensure_bridge(controller, prefix)
        debian = image.controller_debian_mirror()
        ensure_service(lab_state, "proxy_pid", proxy.marker(), "apt-cacher-ng",
                       lambda: proxy.start(controller, debian))
        to_boot = [n for n in wanted if n not in keep]
        root_images = {}
        for suite in sorted({fleet.distro(n) for n in to_boot}):
            log = paths.LOG_DIR / f"image-{suite}.log"
            if not image.is_cached(suite):
                say(f"building the base image (Debian {suite}, once; log {log}) ...")
            root_images[suite] = image.build(log, proxy_url=proxy.url(controller), suite=suite)
        mirror.populate(say)
        ensure_service(lab_state, "mirror_pid", mirror.marker(), "python3", lambda: mirror.start(controller))

        write_ssh_files({n: addresses[n] for n in fleet.hosts if n in keep or n in wanted})
        started: dict[str, int] = {}
        for name in to_boot:
            spec = HostSpec(name, fleet.hosts[name], addresses[name], controller, prefix)
            network.create_host_net(name, spec.address, prefix, controller)
            root = hosts.mount_root(spec, root_images[fleet.distro(name)])
            hosts.write_host_files(root, spec, addresses, pubkey)
            started[name] = hosts.boot(spec, root)
            records[name] = {"address": spec.address, "profile": spec.profile, "distro": fleet.distro(name),
                             "pid": started[name]}
            state.save_state(lab_state)
        if keep:
            say(f"already up: {', '.join(sorted(keep))}")
        errors = hosts.wait_ready(started)
        for name, error in errors.items():
            say(f"{name}: {error}\n--- console log ({hosts.console_log(name)}) ---\n{hosts.log_tail(name)}\n---")
        for name in started:
            if name not in errors:
                say(f"{name}: up at {addresses[name]} ({fleet.hosts[name]})")
        say(f"ssh: ssh -F {paths.SSH_CONFIG} HOST    mirror: {mirror.url(controller)}")
        return 1 if errors else 0


def reset(names: list[str], say: Say) -> int:
    """Reinstall lab hosts: each goes back to the clean image (its overlay's upper layer discarded), keeping
    its address, profile and host key; the other hosts keep running."""
    with locked():
        lab_state = state.load_state()
        records = lab_state.get("hosts", {})
        unknown = [n for n in names if n not in records]
        if unknown:
            raise LabError(f"not lab hosts that are up: {', '.join(unknown)}; hosts: {', '.join(records) or 'none'}")
        fleet_path = Path(lab_state["fleet_file"])
        for name in names:
            record = records.pop(name)
            remove_hosts([name], [record["pid"]] if record.get("pid") else [])
        state.save_state(lab_state)
    say(f"reinstalling {', '.join(names)} from the clean image ...")
    return up(fleet_path, names, say)


def reboot(names: list[str], say: Say, timeout: float = 60.0) -> int:
    """Reboot lab hosts as a real machine reboots: `systemctl reboot` inside each, which ends its systemd-nspawn
    (nspawn exits when the container's init reboots, where systemd-nspawn@.service would start it again), then
    the same root booted again, its disk as the reboot left it. Returns 1 when a host does not come back."""
    with locked():
        lab_state = state.load_state()
        records = lab_state.get("hosts", {})
        down_hosts = [n for n in names if not state.host_is_up(n, records.get(n))]
        if down_hosts:
            raise LabError(f"not lab hosts that are up: {', '.join(down_hosts)}; fix: r1fleet lab up")
        fleet = state.read_lab_layout(Path(lab_state["fleet_file"]))
        controller, _, prefix = fleet.addresses()
        for name in names:
            subprocess.run(hosts.ssh_argv(name, "systemctl", "reboot"), capture_output=True, timeout=30)
        deadline = time.monotonic() + timeout
        started: dict[str, int] = {}
        for name in names:
            pid, marker = records[name]["pid"], str(paths.root_dir(name))
            while procs.is_ours(pid, marker) and not procs.exited(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if procs.is_ours(pid, marker) and not procs.exited(pid):
                raise LabError(f"{name} did not shut down within {int(timeout)} s of `systemctl reboot`")
            spec = HostSpec(name, records[name]["profile"], records[name]["address"], controller, prefix)
            started[name] = records[name]["pid"] = hosts.boot(spec, paths.root_dir(name))
            state.save_state(lab_state)
        errors = hosts.wait_ready(started)
    for name in names:
        say(f"{name}: {errors[name]}" if name in errors else f"{name}: rebooted")
    return 1 if errors else 0


def down(say: Say) -> int:
    with locked():
        lab_state = state.load_state()
        names = set(lab_state.get("hosts", {})) | {p.name for p in paths.ROOTS_DIR.glob("*")} \
            | {ns[len(paths.NETNS_PREFIX):] for ns in network.lab_netns()}
        pids = [rec.get("pid") for rec in lab_state.get("hosts", {}).values()]
        pids += procs.find(str(paths.ROOTS_DIR), "systemd-nspawn")
        stop_processes(sorted({p for p in pids if p}), str(paths.ROOTS_DIR))
        clean_stale(set(), {"hosts": {}})
        for name in names:
            hosts.unmount_root(name)
        for key, marker, program in (("proxy_pid", proxy.marker(), "apt-cacher-ng"),
                                     ("mirror_pid", mirror.marker(), "python3")):
            pids = [lab_state.get(key)] + procs.find(marker, program)
            stop_processes([p for p in pids if p], marker)
        network.remove_all()
        shutil.rmtree(paths.HOSTS_DIR, ignore_errors=True)
        leftovers = hosts.mounted_lab_roots()
        if leftovers:
            say(f"still mounted: {', '.join(leftovers)}")
            return 1
        for entry in paths.RUN_DIR.iterdir():
            if entry.name != "lock":
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    shutil.rmtree(paths.RUN_DIR, ignore_errors=True)
    say("lab is down")
    return 0
