"""Network helpers every part of r1fleet shares: which addresses are loopback, `host:port` with IPv6
brackets, and this machine's own address on the route to another."""

from __future__ import annotations

import ipaddress
import socket


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
