"""Network helpers every part of r1fleet shares: which addresses are loopback, and `host:port` with IPv6
brackets."""

from __future__ import annotations

import ipaddress


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
