"""`r1fleet status` (the fleet's `ollama ps`) and `r1fleet endpoints` (where clients reach each host's model).

    r1fleet status --fleet lab                  # one row per host, in one SSH round trip per host
    r1fleet status --fleet lab lab-4090 --json
    r1fleet status --watch                      # every 2 s until Ctrl-C
    r1fleet endpoints --format litellm          # or table, json, openwebui, env; --show-keys prints keys

Exit status: 0 every host serves as planned (status) or has an endpoint (endpoints); 1 otherwise; 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from r1fleet.errors import R1FleetError
from r1fleet.fleet.config import read_api_key
from r1fleet.fleet.file import FLEET_HELP, load_fleet
from r1fleet.roles.gateway.decide import gateway_endpoint
from r1fleet.status.collect import endpoint_for, reach, selected, statuses
from r1fleet.status.endpoints import FORMATS, render
from r1fleet.status.table import status_table

WATCH_EVERY_S = 2.0
CLEAR = "\033[H\033[2J"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "status", help="what each host serves now: model, memory, endpoint, unit, lock (no token generated)",
        description="Per host, in one SSH round trip each and in parallel: backend and version, the model and whether "
                    "it is loaded, GPU memory used against planned, the endpoint, the unit's state, and drift from the "
                    "fleet lock. A host that is down or not deployed gets one line with the reason.",
    )
    p.add_argument("hosts", nargs="*", metavar="HOST", help="only these hosts (default: every host of the fleet)")
    p.add_argument("--fleet", help=FLEET_HELP)
    p.add_argument("--json", action="store_true", help='print {"hosts": [...]} (with --watch: one line per refresh)')
    p.add_argument("--watch", action="store_true", help=f"refresh every {WATCH_EVERY_S:g} s until Ctrl-C")
    p.add_argument("--rehearsal", action="store_true", help="expect the rehearsal stand-in on every host")
    p.set_defaults(run=cmd_status)

    e = subparsers.add_parser(
        "endpoints", help="each host's endpoint and model name, for Open WebUI, LiteLLM or your shell",
        description="Each host's OpenAI-compatible endpoint and the model name clients send, in the configuration "
                    "format of the tool you point at the fleet. Keys are read from the controller's key files "
                    "(api_key_source) only with --show-keys.",
    )
    e.add_argument("hosts", nargs="*", metavar="HOST", help="only these hosts (default: every host of the fleet)")
    e.add_argument("--fleet", help=FLEET_HELP)
    e.add_argument("--format", default="table", choices=FORMATS, help="output format (default: table)")
    e.add_argument("--show-keys", action="store_true", help="print the API keys themselves (read from api_key_source)")
    e.add_argument("--rehearsal", action="store_true", help="the hosts serve the rehearsal stand-in (deploy --data rehearsal=true)")
    e.set_defaults(run=cmd_endpoints)


def status_once(fleet, entries, args) -> tuple[str, bool]:
    found = statuses(reach(fleet, entries, live=True, rehearsal=args.rehearsal))
    if args.json:
        text = json.dumps({"hosts": [s.document() for s in found]}, indent=None if args.watch else 2)
    else:
        text = status_table(found)
    return text, all(s.healthy for s in found)


def cmd_status(args: argparse.Namespace) -> int:
    fleet = load_fleet(args.fleet)
    entries = selected(fleet, args.hosts)
    if not args.watch:
        text, healthy = status_once(fleet, entries, args)
        print(text)
        return 0 if healthy else 1
    screen = sys.stdout.isatty() and not args.json
    try:
        while True:
            started = time.monotonic()
            text, _ = status_once(fleet, entries, args)
            if screen:
                heading = f"r1fleet status, every {WATCH_EVERY_S:g} s (Ctrl-C to stop)   {time.strftime('%H:%M:%S')}"
                sys.stdout.write(f"{CLEAR}{heading}\n\n{text}\n")
            else:
                sys.stdout.write(text + "\n")
            sys.stdout.flush()
            time.sleep(max(0.0, WATCH_EVERY_S - (time.monotonic() - started)))
    except KeyboardInterrupt:  # the way a watch ends
        if screen:
            sys.stdout.write("\n")
        return 0


def cmd_endpoints(args: argparse.Namespace) -> int:
    fleet = load_fleet(args.fleet)
    reached = reach(fleet, selected(fleet, args.hosts), live=False, rehearsal=args.rehearsal)
    endpoints, missing = [], []
    for name, target in reached.targets.items():
        if target.plan is None:
            missing.append(f"{name}: {target.error or 'not planned'}")
            continue
        try:
            endpoint = endpoint_for(target)
        except R1FleetError as err:  # the deploy refuses this host's exposure: it serves nothing to name
            missing.append(str(err))
            continue
        if endpoint is None:
            if target.pool_role != "worker":  # a worker's devices serve its head's endpoint
                missing.append(f"{name}: {target.error or 'serves no model'}")
            continue
        endpoints.append(endpoint)
    keys, gateway, gateway_key = {}, None, None
    if args.show_keys:
        for e in endpoints:
            if e.key_needed and e.key_file:
                keys[e.host] = fleet.hosts[e.host].api_key_text().decode().strip()
    if fleet.gateway is not None:
        gateway = gateway_endpoint(fleet.gateway, fleet.hosts[fleet.gateway.host], endpoints)
        if args.show_keys and fleet.gateway.api_key_source:
            gateway_key = read_api_key(fleet.gateway.api_key_source, fleet.gateway.host,
                                       "gateway.api_key_source").decode().strip()
    print(render(endpoints, args.format, keys, gateway, gateway_key))
    for line in missing:
        print(f"r1fleet: {line}", file=sys.stderr)
    return 1 if missing else 0
