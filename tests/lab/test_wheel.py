"""Lab: r1fleet as a pyinfra user installs it. The built wheel goes into a fresh virtualenv outside the
checkout; from a directory of the user's own, its CLI plans and validates, the user's own deploy file
(one call into r1fleet) deploys a lab host, and `r1fleet verify` proves it with the suite the package ships.

Root + lab only (tests/lab/conftest.py); needs the package index for the wheel's dependencies.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_deploy import changed_count

ROOT = Path(__file__).resolve().parents[2]
HOST = "lab-cpu"

USER_INVENTORY = """# my inventory: every host of my fleet file, as r1fleet reads and checks it
from r1fleet.deploy.inventory import fleet

globals().update(fleet())
"""
USER_DEPLOY = """# my deploy: r1fleet's deploy of each host, then whatever else I run on my hosts
from r1fleet.deploy.serve import serve_r1

serve_r1()
"""


def run(argv: list[str], cwd: Path, timeout: int = 900, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(argv, cwd=cwd, env={**clean, **env}, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv in a temporary directory with only the built wheel (and its dependencies) in it."""
    work = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"), str(ROOT)], work)
    [wheel] = (work / "dist").glob("r1fleet-*.whl")
    run([sys.executable, "-m", "venv", str(work / "venv")], work)
    run([str(work / "venv/bin/pip"), "install", "-q", "--disable-pip-version-check", str(wheel)], work)
    return work


def test_the_wheel_is_self_contained(installed: Path):
    site = next((installed / "venv/lib").glob("python3*/site-packages"))
    assert not (site / "roles").exists() and (site / "r1fleet/operations/templates/r1fleet-service.j2").is_file()
    assert (site / "r1fleet/lab/lab.yml").is_file() and (site / "r1fleet/plan/catalog.yaml").is_file()
    assert (site / "r1fleet/verify/suite/test_hosts.py").is_file() and (site / "r1fleet/lab/standins/ollama/ollama").is_file()


def test_a_users_own_deploy_file_deploys_a_lab_host(installed: Path):
    user = installed / "my-fleet"
    user.mkdir()
    (user / "inventory.py").write_text(USER_INVENTORY)
    (user / "deploy.py").write_text(USER_DEPLOY)
    bin_dir = installed / "venv/bin"
    plan = run([str(bin_dir / "r1fleet"), "plan", str(ROOT / "tests/fixtures/probes/cpu-16g.probe")], user)
    assert "cpu-16g" in plan.stdout
    home = installed / "home"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    (home / ".ssh" / "id_ed25519").write_text("the example's key\n")  # validate checks that each ssh_key is there
    run([str(bin_dir / "r1fleet"), "validate", str(ROOT / "inventory/fleet.example.yml")], user, HOME=str(home))
    # the lab from the package alone: up (idempotent here), and a host reinstalled from the clean image with the
    # package's profiles and stand-ins, which the user's deploy then installs from scratch
    run([str(bin_dir / "r1fleet"), "lab", "up"], user)
    run([str(bin_dir / "r1fleet"), "lab", "reset", HOST], user)
    status = json.loads(run([str(bin_dir / "r1fleet"), "lab", "status", "--json"], user).stdout)
    assert {h["name"]: h["state"] for h in status["hosts"]}[HOST] == "up" and "served" in status["mirror"]
    deployed = run([str(bin_dir / "pyinfra"), "-y", "inventory.py", "deploy.py", "--limit", HOST], user,
                   R1FLEET_FLEET="lab")
    assert "all 1 host(s) converged" in deployed.stderr, deployed.stderr[-2000:]
    verified = run([str(bin_dir / "r1fleet"), "verify", "--fleet", "lab", "-k", HOST], user)
    assert "1/1 hosts pass" in verified.stdout, verified.stdout[-2000:]
    # the same job from the package alone, no file of the user's: pyinfra's module:function inventory and deploy
    again = run([str(bin_dir / "pyinfra"), "-y", "r1fleet.deploy.inventory:fleet", "r1fleet.deploy.serve.serve_r1",
                 "--limit", HOST], installed, R1FLEET_FLEET="lab")
    assert "all 1 host(s) converged" in again.stderr, again.stderr[-2000:]
    assert changed_count(again.stdout + again.stderr) == 0, again.stdout[-3000:]  # the host deployed above: no change
    # the removal from the package alone too, dry: what it would stop and remove on the host, changing nothing
    dry = run([str(bin_dir / "pyinfra"), "--dry", "r1fleet.deploy.inventory:fleet", "r1fleet.deploy.remove.remove_r1",
               "--limit", HOST], installed, R1FLEET_FLEET="lab")
    assert "Remove Ollama | Stop r1fleet-ollama.service" in dry.stdout + dry.stderr, dry.stdout[-3000:]
