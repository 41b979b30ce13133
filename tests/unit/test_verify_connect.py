"""How `r1fleet verify` reaches a host: real hosts through ssh with their host keys checked (audit L2)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

from r1fleet.fleet import HostEntry

CONFTEST = Path(__file__).resolve().parents[1] / "verify" / "conftest.py"


def verify_conftest():
    spec = importlib.util.spec_from_file_location("r1fleet_verify_conftest", CONFTEST)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def options(**values):
    return SimpleNamespace(getoption=lambda name, default=None: values.get(name, default))


def test_real_hosts_use_ssh_with_host_key_checking_and_lab_hosts_do_not():
    conftest = verify_conftest()
    config = options(**{"--ssh-timeout": 5, "--fleet": "fleet.yml"})
    real = conftest.connect(HostEntry(name="box", address="192.168.1.21", ssh_user="admin", ssh_key="/k"), config, "/lab.cfg")
    assert real.backend.NAME == "ssh" and "StrictHostKeyChecking=accept-new" in real.backend.ssh_extra_args
    assert "BatchMode=yes" in real.backend.ssh_extra_args and real.backend.ssh_identity_file == "/k"
    lab = conftest.connect(HostEntry(name="lab-4090", address="10.77.0.12", profile="rtx4090"), config, "/lab.cfg")
    assert lab.backend.NAME == "paramiko" and lab.backend.ssh_config == "/lab.cfg"
