"""`python -m r1fleet.lab ...`: the lab commands on their own (same as `r1fleet lab ...`)."""
from __future__ import annotations

import argparse
import sys

from r1fleet.lab import commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r1fleet.lab")
    sub = parser.add_subparsers(dest="command", required=True)
    commands.register(sub)
    args = parser.parse_args(["lab", *(sys.argv[1:] if argv is None else argv)])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
