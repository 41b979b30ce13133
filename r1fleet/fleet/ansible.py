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
import re

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
        if isinstance(entry.get("ssh_port"), str) and re.fullmatch(r"[0-9]{1,5}", entry["ssh_port"].strip()):
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


# An inventory value's template names a few variables; what it renders to is an address, a port, a path.
TEMPLATE_MAX_CHARS = 1024
RENDERED_MAX_CHARS = 65536  # also the longest variable a template may use
# What a template may hold: variables, their attributes and items, literals, conditions, `~` and `+`, and the
# filters below. No call (`lookup(...)`, `range(...)`, a method), loop, assignment or macro, and no `*`, `**`
# or `%`: each of those can make a few characters render to gigabytes ('x' * 3000000000).
TEMPLATE_NODES = frozenset({
    "Template", "Output", "TemplateData", "Name", "Const", "Getattr", "Getitem", "Slice", "List", "Tuple", "Dict",
    "Pair", "Keyword", "Concat", "Add", "Sub", "Neg", "Pos", "And", "Or", "Not", "Compare", "Operand", "CondExpr",
    "If", "Test", "Filter",
})
TEMPLATE_FILTERS = frozenset({
    "default", "d", "lower", "upper", "title", "capitalize", "trim", "string", "int", "float", "bool", "length",
    "count", "first", "last",
})


def _renderer(host_vars: dict, host: str):
    """Render one variable. Ansible's own templating would run lookups on this machine
    (`lookup('pipe', ...)`, and `disable_lookups` no longer stops them in ansible-core 2.19), so templates
    are rendered by a sandboxed Jinja2 with the host's variables only: no lookups, no Ansible plugins, and
    only what cannot grow without bound (TEMPLATE_NODES, TEMPLATE_FILTERS), a value rendering to at most
    RENDERED_MAX_CHARS. A template that fails names the host and the variable."""
    from jinja2 import StrictUndefined, TemplateError
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(undefined=StrictUndefined)
    env.globals.clear()
    context = {str(k): _plain(v) for k, v in host_vars.items()}
    for key, value in context.items():
        if isinstance(value, str) and len(value) > RENDERED_MAX_CHARS:
            context[key] = StrictUndefined(hint=f"{key} is longer than {RENDERED_MAX_CHARS} characters, too long to "
                                                "use in a template", name=key)

    def render(name: str, value: Any) -> Any:
        try:
            return _render(env, _plain(value), context)
        except (TemplateError, MemoryError, OverflowError, RecursionError) as error:
            reason = error if isinstance(error, TemplateError) else f"it does not render ({type(error).__name__})"
            raise FleetError(f"{name} cannot be read: {reason}", host=host, field=name,
                             fix="give the value itself, or define the variable (r1fleet renders variables, their "
                                 "attributes and a few filters, without lookups, calls or loops)") from None

    return render


def _render(env: Any, value: Any, context: dict, depth: int = 3) -> Any:
    if isinstance(value, str) and "{{" in value and depth:
        return _render(env, _rendered(env, value, context), context, depth - 1)
    if isinstance(value, dict):
        return {k: _render(env, v, context, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(env, v, context, depth) for v in value]
    return value


def _rendered(env: Any, source: str, context: dict) -> str:
    """One template rendered, checked first against TEMPLATE_NODES and TEMPLATE_FILTERS, and stopped as soon
    as its text passes RENDERED_MAX_CHARS (TemplateError)."""
    from jinja2 import TemplateError, nodes

    if len(source) > TEMPLATE_MAX_CHARS:
        raise TemplateError(f"a template of {len(source)} characters; r1fleet renders at most {TEMPLATE_MAX_CHARS}")
    tree = env.parse(source)
    for node in [tree, *tree.find_all(nodes.Node)]:
        kind = type(node).__name__
        if kind not in TEMPLATE_NODES:
            raise TemplateError(f"it holds a {kind} node ({_NODE_WORDS.get(kind, kind.lower())}); r1fleet renders "
                                "variables, their attributes and items, literals, conditions, ~ and +, and a few filters")
        if isinstance(node, nodes.Filter) and node.name not in TEMPLATE_FILTERS:
            raise TemplateError(f"filter {node.name!r} is not rendered here; r1fleet's are {', '.join(sorted(TEMPLATE_FILTERS))}")
    text, size = [], 0
    for chunk in env.from_string(tree).generate(context):
        size += len(chunk)
        if size > RENDERED_MAX_CHARS:
            raise TemplateError(f"it renders to more than {RENDERED_MAX_CHARS} characters")
        text.append(chunk)
    return "".join(text)


_NODE_WORDS = {"Call": "a call such as lookup(...) or range(...)", "Mul": "*", "Pow": "**", "Mod": "%",
               "FloorDiv": "//", "Div": "/", "For": "a loop", "Assign": "{% set %}", "AssignBlock": "{% set %}",
               "Macro": "a macro", "CallBlock": "{% call %}", "FilterBlock": "{% filter %}", "Include": "an include",
               "Import": "an import", "FromImport": "an import", "Extends": "{% extends %}", "With": "{% with %}",
               "NSRef": "a namespace", "Block": "a block"}


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
