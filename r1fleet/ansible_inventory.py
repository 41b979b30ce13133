"""Read an Ansible inventory (YAML or INI, with group_vars/host_vars) as a fleet-file-shaped dict.

`fleet_dict_from_ansible(path)` goes through ansible-core's own InventoryManager and
VariableManager, so group/host variable precedence is Ansible's. Mapping:
  ansible_host -> address, ansible_user -> ssh_user, ansible_port -> ssh_port,
  ansible_ssh_private_key_file -> ssh_key, group names -> groups,
  r1fleet_<setting> host/group vars -> <setting> (r1fleet_listen, r1fleet_allow, r1fleet_policy, ...).
The result is validated by r1fleet.fleet like any fleet file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from r1fleet.errors import FleetError

CONNECTION_VARS = {
    "ansible_host": "address",
    "ansible_user": "ssh_user",
    "ansible_port": "ssh_port",
    "ansible_ssh_private_key_file": "ssh_key",
}
PREFIX = "r1fleet_"
# Groups every Ansible inventory has; they say nothing about the host.
IMPLICIT_GROUPS = {"all", "ungrouped"}


def looks_like_ansible_inventory(path: str | Path) -> bool:
    """True for an INI inventory or a YAML file whose top level is Ansible groups (`all:` ...)."""
    p = Path(path)
    if p.is_dir():
        return True
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix in (".ini", ".cfg", "") and "[" in text:
        return True
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(doc, dict) and "hosts" not in doc and any(
        isinstance(v, dict) and ({"hosts", "children", "vars"} & set(v)) for v in doc.values())


def fleet_dict_from_ansible(path: str | Path) -> dict[str, Any]:
    """{"defaults": {}, "hosts": {name: {...}}} from an Ansible inventory file or directory."""
    p = Path(path)
    if not p.exists():
        raise FleetError(f"{p} does not exist", field="R1FLEET_FLEET", fix="point R1FLEET_FLEET at an inventory file")
    # Imported here: ansible-core is heavy and only needed for this input format.
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.vars.manager import VariableManager

    loader = DataLoader()
    inventory = InventoryManager(loader=loader, sources=[str(p)])
    variables = VariableManager(loader=loader, inventory=inventory)
    hosts: dict[str, dict[str, Any]] = {}
    for ahost in inventory.get_hosts():
        host_vars = variables.get_vars(host=ahost)
        entry: dict[str, Any] = {"address": ahost.name}
        for ansible_key, fleet_key in CONNECTION_VARS.items():
            if host_vars.get(ansible_key) is not None:
                entry[fleet_key] = _plain(loader, host_vars[ansible_key])
        for key, value in host_vars.items():
            if key.startswith(PREFIX) and len(key) > len(PREFIX):
                entry[key[len(PREFIX):]] = _structured(_plain(loader, value))
        if "ssh_port" in entry:
            entry["ssh_port"] = int(entry["ssh_port"])
        groups = sorted(g.name for g in ahost.get_groups() if g.name not in IMPLICIT_GROUPS)
        if groups:
            entry["groups"] = sorted(set(entry.get("groups", [])) | set(groups))
        hosts[ahost.name] = entry
    if not hosts:
        raise FleetError(f"no hosts in Ansible inventory {p}", field="hosts",
                         fix="add hosts to the inventory (ansible-inventory -i FILE --list shows what Ansible sees)")
    return {"defaults": {}, "hosts": hosts}


def _structured(value: Any) -> Any:
    """INI [group:vars] values are always strings (Ansible docs): read '[...]'/'{...}' as YAML."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        import yaml

        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return value


def _plain(loader: Any, value: Any) -> Any:
    """Ansible's tagged/lazy values -> plain Python (str, int, bool, list, dict); templates rendered."""
    from ansible.template import Templar

    if isinstance(value, str) and "{{" in value:
        value = Templar(loader=loader).template(value)
    if isinstance(value, dict):
        return {str(k): _plain(loader, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(loader, v) for v in value]
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value
