"""Network helpers every part of r1fleet shares: which addresses are loopback, `host:port` with IPv6
brackets, this machine's own address on the route to another, and JSON from the network (a registry's
manifest, a host's answer) parsed totally."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from typing import Any

JSON_MAX_DEPTH = 16  # far deeper than any document r1fleet reads (a manifest nests three levels, /api/tags five)


def is_loopback(address: str | None) -> bool:
    """True for addresses only this host can reach (127.0.0.0/8, ::1, localhost); None counts as loopback."""
    if address is None or address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def host_port(address: str, port: int) -> str:
    """`address:port`, with IPv6 addresses in brackets (`[fd00::5]:11434`)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def source_address_towards(address: str) -> str | None:
    """This machine's source address for packets to `address` (a UDP connect sends nothing); None without a route."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((address, 9))
            return probe.getsockname()[0]
    except OSError:
        return None


def parse_json(data: bytes | str, max_depth: int = JSON_MAX_DEPTH) -> Any:
    """JSON from the network, parsed totally: ValueError for anything but UTF-8 JSON nested at most `max_depth`
    deep, without NaN or Infinity (json.loads takes both, and int(Infinity) raises OverflowError). The depth is
    counted before parsing, so a 1 MiB `[[[...` never reaches the parser's recursion."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data  # UnicodeDecodeError is a ValueError
    depth = 0
    for token in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[{]|[\]}]', text):
        if token[0] in "[{":
            depth += 1
            if depth > max_depth:
                raise ValueError(f"nested deeper than {max_depth} levels")
        elif token[0] in "]}":
            depth -= 1

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text, parse_constant=no_constant)
    except RecursionError:  # cannot happen after the count above; kept total all the same
        raise ValueError("nested too deep") from None
