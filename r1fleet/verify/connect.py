"""How `r1fleet verify` reaches each host and plans it, exactly as the deploy does: connect over SSH (or
testinfra's Ansible backend), probe over that connection -> parse_probe -> what the host serves (r1fleet/lock/served.py).
Hosts are prepared in parallel, each within a deadline, so a dead host fails fast.

Nothing here is pytest's: the suite (r1fleet/verify/suite/conftest.py) turns its options into
`ConnectOptions` and hands over the `Target`s (r1fleet/verify/target.py) it selected. `r1fleet status` and
`r1fleet endpoints` reach and plan hosts with the same functions (r1fleet/status/collect.py), the status script
riding on the probe's round trip.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import testinfra

from r1fleet.fleet.config import HostConfig
from r1fleet.errors import R1FleetError
from r1fleet.probe.facts import probe_script
from r1fleet.hardware import parse_probe
from r1fleet.net import host_port
from r1fleet.lock.served import served_plans
from r1fleet.verify.target import Target

PROBE_TIMEOUT_S = 120
SSH_VERIFY_ARGS = "-o BatchMode=yes -o StrictHostKeyChecking=accept-new"


@dataclass(frozen=True)
class ConnectOptions:
    """How the run reaches and plans its hosts (from the suite's command line)."""

    ssh_timeout: int = 10
    ansible_inventory: str | None = None  # connect through testinfra's Ansible backend with this inventory
    rehearsal: bool = False  # expect the rehearsal stand-in on every host
    lock: Any = None  # the fleet's lock (r1fleet.lock.match.Lock): a locked host is verified against its locked plan
    fleet: str | None = None  # the fleet as the user names it, for the relock command


def connect(entry: HostConfig, options: ConnectOptions) -> Any:
    """The testinfra host for a fleet entry: paramiko from the fleet's SSH settings, or testinfra's Ansible backend."""
    if options.ansible_inventory:
        # testinfra runs `ansible-inventory`: find it beside this Python (a venv not on PATH).
        bindir = str(Path(sys.executable).parent)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        return testinfra.get_host(f"ansible://{entry.name}", ansible_inventory=options.ansible_inventory)
    where = host_port(entry.address, entry.ssh_port)
    kwargs: dict[str, Any] = {"timeout": options.ssh_timeout}
    if entry.ssh_key:
        kwargs["ssh_identity_file"] = entry.ssh_key
    if entry.ssh_user != "root":
        kwargs["sudo"] = True
    # Through the system ssh client, host keys checked (testinfra's paramiko backend accepts any key): a real host's
    # against ~/.ssh/known_hosts, recorded on first contact as pyinfra's deploy does, a changed key stopping the
    # run; a plug-in's own host (the lab's) against the keys the plug-in made for it, and no other.
    kwargs["ssh_extra_args"] = (f"-o BatchMode=yes -o StrictHostKeyChecking=yes "
                                f"-o UserKnownHostsFile={shlex.quote(entry.ssh_known_hosts)}"
                                if entry.ssh_known_hosts else SSH_VERIFY_ARGS)
    return testinfra.get_host(f"ssh://{entry.ssh_user}@{where}", **kwargs)


def ssh_failure(where: str, err: BaseException | str) -> str:
    """Why a host cannot be reached, in one line and the reason first:
    `timed out connecting over SSH to root@10.0.0.9:22 (fix: ...)`."""
    inner = getattr(err, "errors", None)  # paramiko's NoValidConnectionsError: the socket's own error per address
    if isinstance(inner, dict) and inner:
        err = next(iter(inner.values()))
    result = err.args[0] if isinstance(err, RuntimeError) and err.args else None
    if hasattr(result, "stderr") and getattr(result, "exit_status", None) == 255:
        # testinfra's ssh backend raises its CommandResult when the ssh client itself failed (backend/ssh.py
        # run_ssh): the client's last line says why, e.g. `ssh: connect to host 10.0.0.9 port 22: No route to host`
        lines = str(result.stderr).strip().splitlines()
        err = re.sub(r"^ssh: connect to host \S+ port [0-9]+: ", "", lines[-1]) if lines else "ssh failed (exit 255)"
    if isinstance(err, str):
        reason, network = err, True
    else:
        reason = re.sub(r"^\[Errno [^\]]*\]\s*", "", str(err).strip()) or type(err).__name__
        network = isinstance(err, (OSError, EOFError))
        if not network:  # paramiko's SSHException family and testinfra's RuntimeError: the kind says what failed
            reason = f"{type(err).__name__}: {reason}"
    fix = "check that the host is up, its address, and that sshd runs" if network else "check the address, user and key"
    return f"{reason} connecting over SSH to {where} (fix: {fix})"


def connect_and_probe(target: Target, options: ConnectOptions, then: str = "") -> None:
    """Connect and probe (as the deploy does), then run `then` in the same round trip (`r1fleet status` reads its
    service there). The whole output is kept as `target.cache["document"]`. Records an error on the target instead
    of raising."""
    entry = target.entry
    where = f"{entry.ssh_user}@{host_port(entry.address, entry.ssh_port)}"
    command = f"sh -c {shlex.quote(probe_script())} r1fleet-probe {shlex.quote(entry.model_dir)}"
    try:
        target.host = connect(entry, options)
        result = target.run(f"{command}; {then}" if then else command, PROBE_TIMEOUT_S)
    except Exception as err:  # OSError (refused, timed out), EOFError, paramiko's SSHException, testinfra's RuntimeError
        target.error = ssh_failure(where, err)
        return
    if result.rc == 255:  # the system ssh client's own failure (the ssh:// backend)
        lines = result.stderr.strip().splitlines()
        target.error = ssh_failure(where, lines[-1] if lines else "ssh failed (exit 255)")
        return
    if result.rc != 0 or "#### r1fleet:" not in result.stdout:
        target.error = f"the probe failed on {where} (exit {result.rc}): {result.stderr.strip()[-300:] or 'no probe document'}"
        return
    target.cache["document"] = result.stdout
    try:
        target.hardware = parse_probe(result.stdout, entry.name)
    except R1FleetError as err:
        target.error = f"cannot plan: {err}"


def connect_and_probe_all(targets: dict[str, Target], options: ConnectOptions,
                          then: Callable[[HostConfig], str] | None = None) -> None:
    """`connect_and_probe` every target in parallel (with `then(entry)` after each probe); a host still connecting
    or probing at the deadline is recorded as hung."""
    threads = {name: threading.Thread(target=connect_and_probe, args=(t, options, then(t.entry) if then else ""),
                                      daemon=True) for name, t in targets.items()}
    for thread in threads.values():
        thread.start()
    deadline = time.monotonic() + PROBE_TIMEOUT_S + options.ssh_timeout * 4 + 10
    for name, thread in threads.items():
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            targets[name].error = f"connecting and probing took longer than {int(deadline - time.monotonic() + 1)} s; the host hangs"


def plan_targets(pools: dict, targets: dict[str, Target], options: ConnectOptions) -> None:
    """What each probed host serves, as the deploy serves it (r1fleet/lock/served.py): a pool member against its
    part of a pooled pool (the head: the model split over every member's devices; a worker: its rpc-server),
    any other host against its locked or today's plan. A pool whose members were not all reached leaves its
    members their own plans."""
    probed = {name: t for name, t in targets.items() if t.hardware is not None and t.error is None}
    served = served_plans({name: t.entry for name, t in probed.items()}, pools, options.lock,
                          {name: t.hardware for name, t in probed.items()}, options.fleet, options.rehearsal)
    for name, answer in served.items():
        target = targets[name]
        if isinstance(answer, R1FleetError):
            target.error = f"cannot plan: {answer}"
            continue
        target.plan, target.locked = answer.plan, answer.locked
        if answer.role != "alone":
            target.pool, target.pool_role = answer.pool, answer.role
        elif not answer.plan.fits or not answer.plan.backend:
            target.error = f"no model fits this host, so nothing is served: {'; '.join(answer.plan.reasons)}"
