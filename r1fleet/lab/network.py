"""The lab network: a bridge on the controller and one network namespace per host.

No forwarding or NAT is set up, so lab traffic stays between the controller and its
namespaces (docs/research/lab-notes.md: `--network-veth` needs machined, hence plain `ip`).
"""
from __future__ import annotations

import ipaddress
import json
import subprocess

from r1fleet.lab import paths


class NetworkError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def plan_addresses(subnet: str, hosts: list[str]) -> tuple[str, dict[str, str], int]:
    """Controller address (.1) and host addresses (.11, .12, ... in file order), and the prefix length."""
    try:
        net = ipaddress.ip_network(subnet)
    except ValueError as exc:
        raise NetworkError(f"inventory lab.subnet {subnet!r} is not a network ({exc}); fix: e.g. 10.77.0.0/24") from exc
    if net.num_addresses < 11 + len(hosts) + 1:
        raise NetworkError(f"lab.subnet {subnet} is too small for {len(hosts)} hosts; fix: use a /24")
    controller = str(net.network_address + 1)
    return controller, {h: str(net.network_address + 11 + i) for i, h in enumerate(hosts)}, net.prefixlen


def link_exists(name: str) -> bool:
    return ip("link", "show", "dev", name, check=False).returncode == 0


def ensure_bridge(controller: str, prefix: int) -> None:
    if not link_exists(paths.BRIDGE):
        ip("link", "add", paths.BRIDGE, "type", "bridge")
    current = json.loads(ip("-j", "addr", "show", "dev", paths.BRIDGE).stdout or "[]")
    addrs = {(a["local"], a["prefixlen"]) for link in current for a in link.get("addr_info", [])}
    if (controller, prefix) not in addrs:
        ip("addr", "add", f"{controller}/{prefix}", "dev", paths.BRIDGE)
    ip("link", "set", paths.BRIDGE, "up")


def netns_exists(name: str) -> bool:
    return name in list_netns()


def list_netns() -> list[str]:
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def create_host_net(host: str, address: str, prefix: int, controller: str) -> None:
    ns, veth = paths.netns_name(host), paths.veth_name(host)
    remove_host_net(host)
    ip("netns", "add", ns)
    ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    ip("link", "set", veth, "master", paths.BRIDGE, "up")
    ip("-n", ns, "addr", "add", f"{address}/{prefix}", "dev", "eth0")
    ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", ns, "link", "set", "eth0", "up")
    ip("-n", ns, "route", "add", "default", "via", controller)


def remove_host_net(host: str) -> None:
    ns, veth = paths.netns_name(host), paths.veth_name(host)
    if link_exists(veth):
        ip("link", "del", veth, check=False)
    if netns_exists(ns):
        ip("netns", "del", ns, check=False)


def lab_links() -> list[str]:
    """Every link on the controller the lab made (by its name prefix)."""
    links = json.loads(ip("-j", "link", "show").stdout or "[]")
    return [link["ifname"] for link in links
            if link["ifname"] == paths.BRIDGE or link["ifname"].startswith(paths.VETH_PREFIX)]


def lab_netns() -> list[str]:
    return [ns for ns in list_netns() if ns.startswith(paths.NETNS_PREFIX)]


def remove_all() -> None:
    for ns in lab_netns():
        ip("netns", "del", ns, check=False)
    for link in lab_links():
        ip("link", "del", link, check=False)
