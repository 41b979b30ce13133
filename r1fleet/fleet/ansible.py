"""Read an Ansible inventory (YAML or INI, with group_vars/host_vars) as a fleet-file-shaped dict.

`fleet_dict_from_ansible(path)` goes through ansible-core's own InventoryManager and
VariableManager, so group/host variable precedence is Ansible's. Mapping:
  ansible_host or ansible_ssh_host -> address, ansible_user or ansible_ssh_user -> ssh_user,
  ansible_port or ansible_ssh_port -> ssh_port, ansible_private_key_file or ansible_ssh_private_key_file -> ssh_key
  (the ssh_ name winning, as in Ansible's ssh connection), group names -> groups,
  r1fleet_<setting> host/group vars -> <setting> (r1fleet_listen, r1fleet_allow, r1fleet_policy, ...).
The result is validated by r1fleet.fleet.file like any fleet file.
"""

from __future__ import annotations

import os

from pathlib import Path
from typing import Any

from r1fleet.errors import FleetError

# Ansible's connection variables, per fleet setting in the order the ssh connection plugin lists them
# (ansible/plugins/connection/ssh.py, each option's `vars:`). The last one a host defines wins
# (ansible/config/manager.py, _loop_entries), so ansible_ssh_host overrides ansible_host as it does in Ansible;
# without either, the inventory name is the address.
CONNECTION_VARS = {
    "address": ("ansible_host", "ansible_ssh_host"),
    "ssh_port": ("ansible_port", "ansible_ssh_port"),
    "ssh_user": ("ansible_user", "ansible_ssh_user"),
    "ssh_key": ("ansible_private_key_file", "ansible_ssh_private_key_file"),
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
    except (yaml.YAMLError, RecursionError):  # not an inventory; the fleet reader says what is wrong
        return False
    return isinstance(doc, dict) and "hosts" not in doc and any(
        isinstance(v, dict) and ({"hosts", "children", "vars"} & set(v)) for v in doc.values())


def fleet_dict_from_ansible(path: str | Path) -> dict[str, Any]:
    """{"defaults": {}, "hosts": {name: {...}}} from an Ansible inventory file or directory."""
    p = Path(path)
    if not p.exists():
        raise FleetError(f"{p} does not exist", field="R1FLEET_FLEET", fix="point R1FLEET_FLEET at an inventory file")
    # Only inventory files are read: no inventory scripts or other plugins that would run code here.
    os.environ["ANSIBLE_INVENTORY_ENABLED"] = "host_list,yaml,ini,toml"
    # Imported here: ansible-core is heavy and only needed for this input format.
    from ansible.errors import AnsibleError

    try:
        return _read_inventory(p)
    except AnsibleError as err:  # a group_vars file that is a list, a YAML error in host_vars, ...
        reason = " ".join(str(err).split())[:400]
        raise FleetError(f"{p}: Ansible cannot read this inventory: {reason}", field="inventory",
                         fix="`ansible-inventory -i FILE --list` shows the same error; correct the file it names") from None


def _read_inventory(p: Path) -> dict[str, Any]:
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.vars.manager import VariableManager

    loader = DataLoader()
    inventory = InventoryManager(loader=loader, sources=[str(p)])
    variables = VariableManager(loader=loader, inventory=inventory)
    hosts: dict[str, dict[str, Any]] = {}
    lab = False
    for ahost in inventory.get_hosts():
        host_vars = variables.get_vars(host=ahost)
        entry: dict[str, Any] = {"address": ahost.name}
        render = _renderer(host_vars, ahost.name)
        for fleet_key, names in CONNECTION_VARS.items():
            for name in names:
                if host_vars.get(name) is not None:
                    entry[fleet_key] = render(name, host_vars[name])
        for key, value in host_vars.items():
            if key.startswith(PREFIX) and len(key) > len(PREFIX):
                entry[key[len(PREFIX):]] = _structured(render(key, value))
        lab = str(entry.pop("lab", "")).lower() in ("true", "yes", "on", "1") or lab
        if isinstance(entry.get("ssh_port"), str) and entry["ssh_port"].strip().isdigit():
            entry["ssh_port"] = int(entry["ssh_port"])  # an INI value is a string; anything else the schema refuses
        groups = sorted(g.name for g in ahost.get_groups() if g.name not in IMPLICIT_GROUPS)
        if groups:
            entry["groups"] = sorted(set(entry.get("groups", [])) | set(groups))
        hosts[ahost.name] = entry
    if not hosts:
        raise FleetError(f"no hosts in Ansible inventory {p}", field="hosts",
                         fix="add hosts to the inventory (ansible-inventory -i FILE --list shows what Ansible sees)")
    # r1fleet_lab: true marks the r1fleet lab (inventory/ansible/lab-hosts.yml), where profiles are allowed
    return {"defaults": {}, "hosts": hosts, **({"lab": {}} if lab else {})}


def _structured(value: Any) -> Any:
    """INI [group:vars] values are always strings (Ansible docs): read '[...]'/'{...}' as YAML."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        import yaml

        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return value


def _renderer(host_vars: dict, host: str):
    """Render one variable. Ansible's own templating would run lookups on this machine
    (`lookup('pipe', ...)`, and `disable_lookups` no longer stops them in ansible-core 2.19), so templates
    are rendered by a sandboxed Jinja2 with the host's variables only: no lookups, no Ansible plugins.
    A template that fails names the host and the variable."""
    from jinja2 import StrictUndefined, TemplateError
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(undefined=StrictUndefined)
    env.globals.clear()
    context = {str(k): _plain(v) for k, v in host_vars.items()}

    def render(name: str, value: Any) -> Any:
        try:
            return _render(env, _plain(value), context)
        except TemplateError as error:
            raise FleetError(f"{name} cannot be read: {error}", host=host, field=name,
                             fix="give the value itself, or define the variable (r1fleet renders templates without lookups or filters of Ansible's)") from None

    return render


def _render(env: Any, value: Any, context: dict, depth: int = 3) -> Any:
    if isinstance(value, str) and "{{" in value and depth:
        return _render(env, env.from_string(value).render(context), context, depth - 1)
    if isinstance(value, dict):
        return {k: _render(env, v, context, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(env, v, context, depth) for v in value]
    return value


def _plain(value: Any) -> Any:
    """Ansible's tagged/lazy values -> plain Python (str, int, bool, list, dict), templates left as text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value
