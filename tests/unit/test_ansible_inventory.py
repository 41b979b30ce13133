"""Ansible inventories (YAML and INI, group_vars/host_vars) -> fleet-file-shaped dicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1fleet.fleet.ansible import CONNECTION_VARS, fleet_dict_from_ansible, looks_like_ansible_inventory
from r1fleet.errors import FleetError
from r1fleet.fleet.file import load_fleet

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "inventory" / "ansible" / "lab-hosts.yml"
EXAMPLE_INI = REPO / "inventory" / "ansible" / "example-hosts.ini"


def test_lab_inventory_matches_the_lab_in_file_order():
    fleet = fleet_dict_from_ansible(LAB)
    hosts = fleet["hosts"]
    assert list(hosts) == ["lab-3060", "lab-4090", "lab-dual3090", "lab-cpu"]
    assert [h["address"] for h in hosts.values()] == ["10.77.0.11", "10.77.0.12", "10.77.0.13", "10.77.0.14"]
    dual = hosts["lab-dual3090"]
    assert dual["ssh_user"] == "root" and dual["ssh_key"] == "/run/r1fleet-lab/id_ed25519"
    assert dual["rehearsal"] is True and dual["profile"] == "dual-rtx3090"          # group_vars + host_vars
    assert dual["policy"] == {"min_context": 8192, "min_tokens_per_second": 5}
    assert dual["groups"] == ["r1lab"]
    assert fleet["lab"] == {} and "lab" not in dual  # r1fleet_lab: true marks the lab fleet
    assert load_fleet(LAB).hosts["lab-dual3090"].profile == "dual-rtx3090"


def test_a_profile_outside_the_lab_is_refused(tmp_path):
    """A profile turns off host-key checking: an inventory must say it is the lab (L1)."""
    inventory = tmp_path / "hosts.yml"
    inventory.write_text("all:\n  hosts:\n    box:\n      ansible_host: 10.0.0.5\n      r1fleet_profile: rtx4090\n")
    with pytest.raises(FleetError) as caught:
        load_fleet(inventory)
    assert "host box: field profile" in str(caught.value) and "r1fleet_lab: true" in str(caught.value)


def test_ini_inventory_with_ports_lists_and_group_vars():
    hosts = fleet_dict_from_ansible(EXAMPLE_INI)["hosts"]
    assert hosts["dual3090"]["ssh_port"] == 2222
    assert hosts["dual3090"]["listen"] == "192.168.1.21"
    assert hosts["dual3090"]["allow"] == ["192.168.1.0/24"]
    assert hosts["tower"]["policy"] == {"min_context": 16384}
    assert hosts["tower"]["ssh_user"] == "admin" and hosts["tower"]["groups"] == ["gpu"]
    assert "policy" not in hosts["studio"] and hosts["studio"]["groups"] == ["mac"]


def test_host_vars_override_group_vars(tmp_path):
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "host_vars").mkdir()
    (tmp_path / "hosts.yml").write_text("all:\n  children:\n    boxes:\n      hosts:\n        a: {ansible_host: 10.0.0.5}\n        b:\n")
    (tmp_path / "group_vars" / "boxes.yml").write_text("r1fleet_model: r1-8b\nr1fleet_port: 9000\n")
    (tmp_path / "host_vars" / "a.yml").write_text("r1fleet_model: r1-32b\n")
    hosts = fleet_dict_from_ansible(tmp_path / "hosts.yml")["hosts"]
    assert hosts["a"]["model"] == "r1-32b" and hosts["b"]["model"] == "r1-8b"
    assert hosts["a"]["port"] == 9000 and hosts["b"]["address"] == "b"   # no ansible_host: the name


def test_detection_and_errors(tmp_path):
    assert looks_like_ansible_inventory(LAB) and looks_like_ansible_inventory(EXAMPLE_INI)
    assert not looks_like_ansible_inventory(REPO / "inventory" / "lab.yml")
    empty = tmp_path / "empty.yml"
    empty.write_text("all:\n  hosts: {}\n")
    with pytest.raises(FleetError, match="no hosts"):
        fleet_dict_from_ansible(empty)
    with pytest.raises(FleetError, match="does not exist"):
        fleet_dict_from_ansible(tmp_path / "missing.yml")


def test_templates_render_without_running_lookups(tmp_path):
    """An inventory value is data: `lookup('pipe', ...)` must never run on the controller (audit M2); an
    undefined variable is a clear error naming host and variable; plain templates still work."""
    marker = tmp_path / "LOOKUP_RAN"
    pipe = tmp_path / "pipe.ini"
    pipe.write_text(f"[g]\nh ansible_host=10.0.0.1 r1fleet_model=\"{{{{ lookup('pipe','touch {marker}') }}}}\"\n")
    with pytest.raises(FleetError) as error:
        load_fleet(str(pipe))
    assert not marker.exists()
    assert "host h" in str(error.value) and "r1fleet_model" in str(error.value) and "a call such as lookup" in str(error.value)
    undefined = tmp_path / "undef.ini"
    undefined.write_text("[g]\nh ansible_host=\"{{ not_defined_anywhere }}\"\n")
    with pytest.raises(FleetError, match="host h: field ansible_host"):
        load_fleet(str(undefined))
    named = tmp_path / "named.ini"
    named.write_text("[g]\nbox ansible_host=\"{{ inventory_hostname }}.lan\"\n")
    assert load_fleet(str(named)).hosts["box"].address == "box.lan"


def test_connection_variables_are_read_as_ansibles_ssh_connection_reads_them(tmp_path):
    """ansible_ssh_host, ansible_ssh_port, ansible_ssh_user and ansible_ssh_private_key_file are honoured, and win
    over their short names when a host has both, as in Ansible; the inventory name is the address only without
    either."""
    (tmp_path / "hosts.ini").write_text(
        "[gpu]\n"
        "desk ansible_ssh_host=192.168.1.21 ansible_ssh_user=admin ansible_ssh_port=2222 ansible_ssh_private_key_file=~/.ssh/desk\n"
        "bigbox ansible_host=192.168.1.22 ansible_ssh_host=192.168.1.99 ansible_port=22 ansible_ssh_port=2200 "
        "ansible_user=me ansible_private_key_file=/k/short ansible_ssh_private_key_file=/k/long\n"
        "mini ansible_host=192.168.1.30 ansible_user=me ansible_port=2022 ansible_private_key_file=/k/mini\n"
        "nameonly.lan\n")
    hosts = load_fleet(tmp_path / "hosts.ini").hosts
    desk, bigbox, mini = hosts["desk"], hosts["bigbox"], hosts["mini"]
    assert (desk.address, desk.ssh_user, desk.ssh_port, desk.ssh_key) == (
        "192.168.1.21", "admin", 2222, str(Path("~/.ssh/desk").expanduser()))
    assert (bigbox.address, bigbox.ssh_user, bigbox.ssh_port, bigbox.ssh_key) == ("192.168.1.99", "me", 2200, "/k/long")
    assert (mini.address, mini.ssh_user, mini.ssh_port, mini.ssh_key) == ("192.168.1.30", "me", 2022, "/k/mini")
    assert hosts["nameonly.lan"].address == "nameonly.lan"


def test_the_connection_variables_are_the_ones_the_installed_ansible_reads():
    """CONNECTION_VARS follows the ssh connection plugin's own list, in its order (the last defined wins)."""
    import yaml
    from ansible.plugins.connection import ssh

    options = yaml.safe_load(ssh.DOCUMENTATION)["options"]
    plugin = {"address": "host", "ssh_port": "port", "ssh_user": "remote_user", "ssh_key": "private_key_file"}
    for setting, option in plugin.items():
        names = [v["name"] for v in options[option]["vars"]]
        assert CONNECTION_VARS[setting] == tuple(n for n in names if n.startswith("ansible_")), setting


def test_a_port_that_is_not_a_number_names_the_host_and_field(tmp_path):
    (tmp_path / "hosts.ini").write_text("[gpu]\ndesk ansible_host=192.168.1.21 ansible_port=twenty-two\n")
    with pytest.raises(FleetError) as caught:
        load_fleet(tmp_path / "hosts.ini")
    assert "host desk: field ssh_port" in str(caught.value) and "whole number" in str(caught.value)


@pytest.mark.parametrize("template, reason", [
    ("'x' * 3000000000", "a Mul node (*)"),  # audit L4: a MemoryError, or 3 GB on a large controller
    ("9 ** 9 ** 9", "a Pow node (**)"),
    ("'%0999999999d' % 1", "a Mod node (%)"),
    ("'x'.center(900000000)", "a call such as lookup"),
    ("range(100000) | join", "is not rendered here"),
    ("'x' | center(900000000)", "filter 'center' is not rendered here"),
    ("'x' | replace('x', big)", "filter 'replace' is not rendered here"),
    ("'{{' ~ ' 9 ** 9 }}'", "a Pow node (**)"),  # what it renders to is a template again: checked too
    ("big ~ big", "big is longer than 65536 characters"),
    ("'9' * 9 | int", "a Mul node"),
])
def test_a_template_cannot_grow_without_bound(tmp_path, template, reason):
    """An inventory value renders to an address, a port or a path: a template that could grow to gigabytes is
    refused before it runs, naming the host, the variable and why; never a MemoryError or a traceback."""
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(f"[g]\nh ansible_host=10.0.0.1 r1fleet_model_dir=\"{{{{ {template} }}}}\" big={'x' * 70000}\n")
    with pytest.raises(FleetError) as refused:
        load_fleet(str(inventory))
    assert "host h: field r1fleet_model_dir: " in str(refused.value) and reason in str(refused.value)
    assert len(str(refused.value)) < 1000


def test_a_template_renders_within_its_bounds(tmp_path):
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[g]\nh ansible_host=10.0.0.1 base=/srv/models "
                         "r1fleet_model_dir=\"{{ base ~ '/' ~ inventory_hostname | upper | default('x') }}\"\n")
    assert load_fleet(str(inventory)).hosts["h"].model_dir == "/srv/models/H"
    long = tmp_path / "long.ini"
    terms = " ~ ".join(["inventory_hostname"] * 60)
    long.write_text(f"[g]\nh ansible_host=10.0.0.1 r1fleet_model_dir=\"{{{{ {terms} }}}}\"\n")
    with pytest.raises(FleetError, match=f"a template of {len(terms) + 6} characters; r1fleet renders at most 1024"):
        load_fleet(str(long))


@pytest.mark.parametrize("port", ["abc", "²", "9" * 5000, "22.5"])
def test_an_ansible_port_that_is_no_number_is_named(tmp_path, port):
    """INI values are strings: one that is not a port number is the schema's to refuse, naming host and field
    (audit L4: `ansible_port=abc` was a ValueError traceback)."""
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(f"[g]\nh ansible_host=10.0.0.1 ansible_port={port}\n", encoding="utf-8")
    with pytest.raises(FleetError, match="host h: field ssh_port: .*(integer|whole number)"):
        load_fleet(str(inventory))
