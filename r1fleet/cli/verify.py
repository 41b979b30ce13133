"""`r1fleet verify`: run the testinfra suite (r1fleet/verify/suite, shipped with the package) against a fleet; exit with pytest's status.

    r1fleet verify --fleet lab                 # every lab host
    r1fleet verify --fleet fleet.yml -k gpu-1  # one host (any pytest -k expression)
    r1fleet verify --junit verify.xml          # also a JUnit XML report for CI

Exit status: 0 every check passed; 1 a check failed; 2 interrupted; 4 usage error (e.g. an invalid
fleet file); 5 nothing selected (-k matched no host or check).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

from r1fleet.errors import R1FleetError
from r1fleet.fleet.file import FLEET_HELP

SUITE = Path(__file__).resolve().parents[1] / "verify" / "suite"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "verify", help="prove each host serves its planned model (testinfra)",
        description="Run r1fleet's testinfra checks against every host of a fleet and print a per-host table.",
    )
    p.add_argument("--fleet", help=FLEET_HELP)
    p.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report")
    p.add_argument("-k", dest="keyword", metavar="EXPR", help="only checks/hosts matching this pytest -k expression, e.g. lab-4090")
    p.add_argument("--report", metavar="FILE", help="also write the per-host table to FILE")
    p.add_argument("--min-speed-fraction", type=float, metavar="F",
                   help="fail below F x the estimated tokens/s (default 0.5; 0.0 for rehearsal hosts)")
    p.add_argument("--hash-models", action="store_true", help="sha256 the served model files even when large")
    p.add_argument("--rehearsal", action="store_true", help="expect the rehearsal stand-in on every host")
    p.add_argument("pytest_args", nargs="*", help="further pytest arguments, after --")
    p.set_defaults(run=cmd_verify)
    return p


def pytest_argv(args: argparse.Namespace, suite: Path = SUITE) -> list[str]:
    """The pytest command line for these options (pure; tested)."""
    argv = [sys.executable, "-m", "pytest", str(suite), "-p", "no:cacheprovider", "-q", "--tb=line", "-rfE",
            "--rootdir", str(suite)]
    if args.fleet:
        argv += ["--fleet", args.fleet]
    if args.junit:
        argv += ["--junit-xml", args.junit]
    if args.keyword:
        argv += ["-k", args.keyword]
    if args.report:
        argv += ["--verify-report", args.report]
    if args.min_speed_fraction is not None:
        argv += ["--min-speed-fraction", str(args.min_speed_fraction)]
    if args.hash_models:
        argv.append("--hash-models")
    if args.rehearsal:
        argv.append("--rehearsal")
    return argv + list(args.pytest_args)


def cmd_verify(args: argparse.Namespace) -> int:
    if not (SUITE / "test_hosts.py").is_file():
        raise R1FleetError(
            f"the verification suite is not at {SUITE}",
            fix="reinstall r1fleet: the suite ships with the package",
        )
    if args.min_speed_fraction is not None and not 0 <= args.min_speed_fraction <= 10:
        raise R1FleetError(f"{args.min_speed_fraction} is out of range", field="--min-speed-fraction", fix="give a fraction such as 0.5")
    if importlib.util.find_spec("testinfra") is None:
        raise R1FleetError("pytest-testinfra is not installed", fix="pip install 'r1fleet[test]'")
    return subprocess.call(pytest_argv(args))  # from the caller's directory: a relative --fleet means what it says
