"""`r1fleet lab up|reset|reboot|down|status|ssh`: the lab's command line (registered into r1fleet's CLI)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from r1fleet.lab import lifecycle, paths, state

EXPECTED_ERRORS = (lifecycle.LabError, state.LabLayoutError, RuntimeError, ValueError, OSError)


def register(subparsers) -> argparse.ArgumentParser:
    lab = subparsers.add_parser("lab", help="a simulated home-lab fleet on this machine (root only)",
                                description="Real Debian systemd hosts in network namespaces, reachable "
                                            "over SSH, with simulated GPUs.")
    sub = lab.add_subparsers(dest="lab_command", metavar="COMMAND", required=True)
    up = sub.add_parser("up", help="boot the lab hosts (idempotent)")
    up.add_argument("--fleet", type=Path, default=state.LAB_FLEET_FILE, help="lab fleet file (default: %(default)s)")
    up.add_argument("--hosts", default="", help="comma-separated subset of the fleet's hosts")
    up.set_defaults(lab_handler=cmd_up)
    down = sub.add_parser("down", help="stop the lab and remove everything it made")
    down.set_defaults(lab_handler=cmd_down)
    reset = sub.add_parser("reset", help="reinstall hosts from the clean image (a rebuild after a disk failure)")
    reset.add_argument("hosts", nargs="+", metavar="HOST")
    reset.set_defaults(lab_handler=cmd_reset)
    reboot = sub.add_parser("reboot", help="reboot hosts (systemctl reboot inside each), keeping their disks")
    reboot.add_argument("hosts", nargs="+", metavar="HOST")
    reboot.set_defaults(lab_handler=cmd_reboot)
    status = sub.add_parser("status", help="show the lab hosts")
    status.add_argument("--json", action="store_true", help="print {\"hosts\": [...]} as JSON")
    status.set_defaults(lab_handler=cmd_status)
    ssh = sub.add_parser("ssh", help="open a shell (or run a command) on a lab host")
    ssh.add_argument("host")
    ssh.add_argument("command", nargs=argparse.REMAINDER, help="command to run instead of a shell")
    ssh.set_defaults(lab_handler=cmd_ssh)
    lab.set_defaults(run=run)
    return lab


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("r1fleet lab: must run as root (it creates network namespaces, mounts and containers); "
              "fix: sudo r1fleet lab " + args.lab_command, file=sys.stderr)
        return 2
    try:
        return args.lab_handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `r1fleet lab status | head`: the reader has what it wanted
        return 0
    except EXPECTED_ERRORS as exc:
        print(f"r1fleet lab {args.lab_command}: {exc}", file=sys.stderr)
        return 1


def say(message: str) -> None:
    print(message, flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    only = [h.strip() for h in args.hosts.split(",") if h.strip()]
    try:
        return lifecycle.up(args.fleet, only or None, say)
    except KeyboardInterrupt:
        print("\ninterrupted: removing what the lab made ...", file=sys.stderr, flush=True)
        lifecycle.down(say)
        return 130
    except BaseException:
        raise


def cmd_reset(args: argparse.Namespace) -> int:
    return lifecycle.reset(args.hosts, say)


def cmd_reboot(args: argparse.Namespace) -> int:
    return lifecycle.reboot(args.hosts, say)


def cmd_down(args: argparse.Namespace) -> int:
    return lifecycle.down(say)


def cmd_status(args: argparse.Namespace) -> int:
    hosts = state.lab_hosts()
    if args.json:
        from r1fleet.lab import mirror

        print(json.dumps({"hosts": hosts, "mirror": {"served": mirror.served_bytes()}}, indent=2))
        return 0
    if not hosts:
        print("no lab hosts")
        return 0
    print(f"{'HOST':<16}{'STATE':<7}{'ADDRESS':<14}{'DEBIAN':<10}PROFILE")
    for host in hosts:
        print(f"{host['name']:<16}{host['state']:<7}{host['address']:<14}{host['distro']:<10}{host['profile']}")
    if any(h["state"] == "up" for h in hosts):
        print(f"\nssh -F {paths.SSH_CONFIG} HOST    mirror: {state.mirror_url()}")
    return 0


def cmd_ssh(args: argparse.Namespace) -> int:
    known = {h["name"]: h for h in state.lab_hosts()}
    if args.host not in known:
        print(f"r1fleet lab ssh: no lab host {args.host!r}; hosts: {', '.join(known) or 'none'}", file=sys.stderr)
        return 1
    if known[args.host]["state"] != "up":
        print(f"r1fleet lab ssh: {args.host} is down; fix: r1fleet lab up", file=sys.stderr)
        return 1
    argv = ["ssh", "-F", str(paths.SSH_CONFIG), args.host, *args.command]
    os.execvp("ssh", argv)
    return 0  # not reached
