"""The lab's state, as other code sees it: which hosts exist, where, and how to reach them.

Public API: `lab_hosts()`, `ssh_config_path()`, `mirror_url()`, `LAB_FLEET_FILE`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import yaml

from r1fleet.artifacts.ollama_release import parse_sha256sums
from r1fleet.fleet.config import LabDistro
from r1fleet.lab import image, mirror, network, paths, procs

LAB_FLEET_FILE = paths.LAB_FLEET_FILE
DEFAULT_SUBNET = "10.77.0.0/24"
DEFAULT_DISTRO = image.DEFAULT_SUITE
DISTROS = get_args(LabDistro)


class LabLayoutError(ValueError):
    pass


@dataclass(frozen=True)
class LabLayout:
    """The lab's hosts and subnet as inventory/lab.yml lays them out (r1fleet.fleet.file.load_fleet reads the
    same file as a fleet)."""

    path: Path
    subnet: str
    hosts: dict[str, str]  # name -> profile, in file order
    distros: dict[str, str] = field(default_factory=dict)  # name -> Debian suite; forky when not given

    def distro(self, name: str) -> str:
        return self.distros.get(name, DEFAULT_DISTRO)

    def addresses(self) -> tuple[str, dict[str, str], int]:
        return network.plan_addresses(self.subnet, list(self.hosts))


def read_lab_layout(path: Path = LAB_FLEET_FILE) -> LabLayout:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise LabLayoutError(f"cannot read lab fleet file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise LabLayoutError(f"lab fleet file {path} is not valid YAML: {exc}") from exc
    subnet = str((data.get("lab") or {}).get("subnet", DEFAULT_SUBNET))
    hosts = data.get("hosts") or {}
    if not isinstance(hosts, dict) or not hosts:
        raise LabLayoutError(f"{path}: 'hosts' must map host names to {{profile: NAME}}")
    result, distros = {}, {}
    for name, spec in hosts.items():
        profile = (spec or {}).get("profile") if isinstance(spec, dict) else None
        if not profile:
            raise LabLayoutError(f"{path}: host {name}: field 'profile' is missing; fix: add e.g. profile: rtx4090")
        result[str(name)] = str(profile)
        distro = spec.get("distro", DEFAULT_DISTRO)
        if distro not in DISTROS:
            raise LabLayoutError(f"{path}: host {name}: field distro: {distro!r} is not a lab distribution; fix: use "
                                 f"one of {', '.join(DISTROS)} (default {DEFAULT_DISTRO})")
        distros[str(name)] = distro
    return LabLayout(Path(path), subnet, result, distros)


def load_state() -> dict:
    try:
        return json.loads(paths.STATE_FILE.read_text())
    except (OSError, ValueError):
        return {}


def save_state(state: dict) -> None:
    paths.RUN_DIR.mkdir(parents=True, exist_ok=True)
    tmp = paths.STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(paths.STATE_FILE)


def host_is_up(name: str, record: dict | None) -> bool:
    return bool(record) and procs.is_ours(record.get("pid"), str(paths.root_dir(name)))


def lab_hosts() -> list[dict]:
    """The hosts of the running lab (or of inventory/lab.yml with state "down" when it is not up)."""
    state = load_state()
    records = state.get("hosts", {})
    try:
        fleet = read_lab_layout(Path(state.get("fleet_file", LAB_FLEET_FILE)))
        fleet_hosts, addresses = dict(fleet.hosts), fleet.addresses()[1]
        distros = {name: fleet.distro(name) for name in fleet.hosts}
    except (LabLayoutError, network.NetworkError):
        fleet_hosts, addresses, distros = {}, {}, {}
    for name, rec in records.items():  # what is running wins over an edited fleet file
        fleet_hosts[name], addresses[name] = rec["profile"], rec["address"]
        distros[name] = rec.get("distro", DEFAULT_DISTRO)
    return [
        {
            "name": name,
            "address": addresses[name],
            "ssh_user": "root",
            "ssh_key": str(paths.SSH_KEY),
            "ssh_config": str(paths.SSH_CONFIG),
            "ssh_known_hosts": str(paths.KNOWN_HOSTS),
            "profile": profile,
            "distro": distros.get(name, DEFAULT_DISTRO),
            "state": "up" if host_is_up(name, state.get("hosts", {}).get(name)) else "down",
        }
        for name, profile in fleet_hosts.items()
    ]


def ssh_config_path() -> Path:
    return paths.SSH_CONFIG


def controller_address() -> str:
    state = load_state()
    if state.get("controller"):
        return state["controller"]
    try:
        return read_lab_layout().addresses()[0]
    except (LabLayoutError, network.NetworkError):
        return network.plan_addresses(DEFAULT_SUBNET, [])[0]


def connection_defaults(fleet_dict: dict) -> dict[str, dict]:
    """For a fleet file with a `lab:` section: each host's address (from the subnet, in file order),
    SSH user and key, and the artifact mirror. Pure: the lab need not be up to validate the file."""
    subnet = str((fleet_dict.get("lab") or {}).get("subnet", DEFAULT_SUBNET))
    hosts = list((fleet_dict.get("hosts") or {}) if isinstance(fleet_dict.get("hosts"), dict) else [])
    controller, addresses, _ = network.plan_addresses(subnet, hosts)
    mirror = f"http://{controller}:{paths.MIRROR_PORT}"
    release = stand_in_release(mirror)
    return {
        name: {"address": address, "ssh_user": "root", "ssh_key": str(paths.SSH_KEY), "mirror": mirror,
               "ssh_known_hosts": str(paths.KNOWN_HOSTS), **({"ollama_release": release} if release else {})}
        for name, address in addresses.items()
    }


def stand_in_release(served_at: str) -> dict | None:
    """The stand-in Ollama release the lab's mirror serves, read from the mirror's directory on this machine
    (a dry run reads nothing over the network): its version, where the hosts fetch it, its sha256 sums. None
    before the lab built it."""
    directory = paths.MIRROR_DIR / mirror.ollama_stand_in_dir()
    try:
        sums = parse_sha256sums((directory / "sha256sum.txt").read_text())
        version = (directory / "VERSION").read_text().strip() if (directory / "VERSION").is_file() else None
    except OSError:
        return None
    return {"version": version or None, "base_url": f"{served_at}/{directory.name}", "sha256": sums}


def mirror_url() -> str:
    return f"http://{controller_address()}:{paths.MIRROR_PORT}"
