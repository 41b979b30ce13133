"""The `r1fleet` command: plan, probe, validate, schema, lab, verify, status, endpoints.

Every user error is printed as one clear message (host, field, fix) with exit status 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
from importlib.metadata import version
from pathlib import Path

from r1fleet.errors import R1FleetError
from r1fleet.fleet.file import json_schema
from r1fleet.cli import cache as cache_commands, lock as lock_commands, status as status_commands, verify as verify_commands
from r1fleet.cli.planning import cmd_plan_hosts
from r1fleet.cli.probing import ssh_options
from r1fleet.fleet import plugins
from r1fleet.cli.lock import cmd_plan_diff
from r1fleet.fleet.file import DEFAULT_FLEET, HOST_NAME_PATTERN, REPO_ROOT, load_fleet, resolve_ref
from r1fleet.plan.catalog import load_catalog
from r1fleet.probe.facts import probe_over_ssh, probe_this_machine

USAGE_ERROR = 2


def _plan_args(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="what each host would get, and why", description=(
        "Plan from saved probe documents (the host name is the file stem), or probe a fleet's hosts live."))
    p.add_argument("probes", nargs="*", type=Path, help="probe documents saved with `r1fleet probe HOST > HOST.probe`")
    p.add_argument("--fleet", help="fleet file, `lab`, or an Ansible inventory: probe its hosts over SSH (and use its policies)")
    p.add_argument("--model", help="force a model: catalog id, Ollama tag, or size such as 32b")
    p.add_argument("--context", type=int, help="force a context length (tokens)")
    p.add_argument("--flash-attention", choices=["auto", "on", "off"],
                   help="plan with flash attention on or off (default: as the runtime decides for the GPU)")
    p.add_argument("--kv-type", choices=["f16", "q8_0", "q4_0"], help="plan with this KV cache type only")
    p.add_argument("--json", action="store_true", help='print {"hosts": [...]} instead of a table')
    p.add_argument("--diff", action="store_true",
                   help="with --fleet: per host, what `r1fleet lock` would change in <fleet>.lock and why, and hardware "
                        "that no longer matches the lock (exit 1 when anything differs)")
    p.add_argument("--probe-dir", type=Path, metavar="DIR",
                   help="with --fleet: read each host's probe from DIR/HOST.probe instead of over SSH")
    p.set_defaults(run=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    if args.context is not None and args.context < 256:
        raise R1FleetError(f"--context {args.context} is too small", fix="give at least 256 tokens, e.g. --context 8192")
    if args.model:
        try:
            load_catalog().find(args.model)
        except KeyError as err:
            raise R1FleetError(err.args[0], field="--model") from None
    if args.flash_attention == "off" and args.kv_type in ("q8_0", "q4_0"):
        raise R1FleetError(f"a {args.kv_type} KV cache needs flash attention", field="--kv-type",
                           fix="drop --flash-attention off, or plan with --kv-type f16")
    if not args.probes and not args.fleet:
        nothing_given(args)
    if (args.diff or args.probe_dir) and not args.fleet:
        flag = "--diff" if args.diff else "--probe-dir"
        raise R1FleetError(f"{flag} works on a fleet's hosts", field=flag, fix="add --fleet FILE (or --fleet lab)")
    if args.diff:
        return cmd_plan_diff(args)
    return cmd_plan_hosts(args)


def nothing_given(args: argparse.Namespace) -> None:
    """`r1fleet plan` alone: the fleet of $R1FLEET_FLEET or the default fleet file when there is one, else this
    machine (as llmfit plans the machine it runs on); it says which on stderr."""
    if os.environ.get("R1FLEET_FLEET") or default_fleet_file():
        args.fleet = resolve_ref(None)
        why = "$R1FLEET_FLEET" if os.environ.get("R1FLEET_FLEET") else "the default fleet file"
        print(f"r1fleet: planning the fleet in {args.fleet} ({why}; give probe files or --fleet to plan others)",
              file=sys.stderr)
        return
    name = socket.gethostname().split(".")[0]
    name = name if re.fullmatch(HOST_NAME_PATTERN, name) else "this-machine"
    print(f"r1fleet: planning this machine ({name}): there is no {DEFAULT_FLEET} here and no $R1FLEET_FLEET "
          "(give --fleet FILE to plan a fleet)", file=sys.stderr)
    args.this_machine = (name, probe_this_machine())


def default_fleet_file() -> Path | None:
    """inventory/fleet.yml where load_fleet would find it (the working directory, else the checkout)."""
    return next((path for path in (DEFAULT_FLEET, REPO_ROOT / DEFAULT_FLEET) if path.is_file()), None)


def _probe_args(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="print a host's probe document (save it to plan offline)")
    p.add_argument("host", help="an SSH destination (honours ~/.ssh/config), or a host of --fleet")
    p.add_argument("--fleet", help="look the host up in this fleet file (or `lab`) for address, user and key")
    p.set_defaults(run=cmd_probe)


def cmd_probe(args: argparse.Namespace) -> int:
    if args.fleet:
        fleet = load_fleet(args.fleet)
        if args.host not in fleet.hosts:
            raise R1FleetError(f"not in {fleet.source}", host=args.host, fix=f"use one of: {', '.join(fleet.hosts)}")
        entry = fleet.hosts[args.host]
        text = probe_over_ssh(entry.address, **ssh_options(entry), name=args.host)
    else:
        text = probe_over_ssh(args.host)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _validate_args(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a fleet file without touching any host")
    p.add_argument("fleet", nargs="?", help="fleet file or Ansible inventory (default $R1FLEET_FLEET or inventory/fleet.yml)")
    p.set_defaults(run=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    fleet = load_fleet(args.fleet, lab_state=False)
    fleet.check_ssh_keys()
    pools = f", {len(fleet.pools)} pools OK ({', '.join(fleet.pools)})" if fleet.pools else ""
    print(f"{fleet.source}: {len(fleet.hosts)} hosts OK ({', '.join(fleet.hosts)}){pools}")
    return 0


def _schema_args(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schema", help="print the fleet file's JSON Schema (for editors)")
    p.set_defaults(run=lambda args: print(json.dumps(json_schema(), indent=2)) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1fleet", description="Turn a home-lab fleet into DeepSeek-R1 servers.")
    parser.add_argument("--version", action="version", version=f"r1fleet {version('r1fleet')}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_plan_args, _probe_args, _validate_args, _schema_args):
        add(sub)
    for register in (verify_commands.register, status_commands.register, lock_commands.register, cache_commands.register):
        register(sub)
    for plugin in plugins.plugins():
        plugin.register(sub)
    describe(parser)
    return parser


def describe(parser: argparse.ArgumentParser) -> None:
    """A subcommand's own --help opens with its one-line description: the line the listing above it shows."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {choice.dest: choice.help for choice in action._choices_actions}
            for name, subparser in action.choices.items():
                if subparser.description is None and listed.get(name):
                    subparser.description = listed[name][:1].upper() + listed[name][1:] + "."
                describe(subparser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except R1FleetError as err:
        print(f"r1fleet: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("r1fleet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
