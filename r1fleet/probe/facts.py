"""Running the probe: a pyinfra fact (one round trip) and a plain-ssh helper for `r1fleet probe HOST`.

Both send r1fleet/probe/probe.sh's text to the host's `sh` and return the probe document unparsed;
r1fleet.hardware.parse_probe turns it into Hardware.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from pyinfra.api import FactBase, QuoteString, StringCommand

from r1fleet.errors import R1FleetError
from r1fleet.probe.text import probe_text
from r1fleet.records import DEFAULT_MODEL_DIR

PROBE_SCRIPT = Path(__file__).with_name("probe.sh")


def probe_script() -> str:
    return PROBE_SCRIPT.read_text(encoding="utf-8")


class R1Probe(FactBase[str]):
    """The host's probe document (see DESIGN.md "Probe document"), as one string.

    The script travels inline (`sh -c '<script>' r1fleet-probe MODEL_DIR`), so nothing is uploaded and
    all facts come back in one round trip. pyinfra 3.10 does not cache facts: callers that need the
    document twice keep it (for example in host.data).
    """

    @staticmethod
    def default() -> str:
        return ""

    def command(self, model_dir: str = DEFAULT_MODEL_DIR) -> StringCommand:
        # "r1fleet-probe" becomes $0 inside the script; the model directory is $1.
        return StringCommand("sh", "-c", QuoteString(probe_script()), "r1fleet-probe", QuoteString(model_dir))

    def process(self, output: list[str]) -> str:
        return probe_text("\n".join(output) + "\n")


def probe_over_ssh(
    host_alias: str,
    model_dir: str = DEFAULT_MODEL_DIR,
    *,
    connect_timeout_s: int = 10,
    timeout_s: int = 120,
    ssh: str = "ssh",
    extra_args: tuple[str, ...] = (),
    name: str | None = None,
) -> str:
    """Run probe.sh on `host_alias` with the system ssh client (so ~/.ssh/config applies) and return the document.

    BatchMode keeps ssh from waiting on a password prompt; failures raise R1FleetError naming the host (`name`, a
    fleet's name for it, else the destination) and the ssh command to make work.
    """
    who = name or host_alias
    check = shlex.join([ssh, "-o", "BatchMode=yes", *extra_args, host_alias, "true"])
    command = [
        ssh, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout_s}", *extra_args,
        # `--`: the destination can never be read as an option (an address like -oProxyCommand=...)
        "--", host_alias, "sh", "-s", "--", _shell_quote(model_dir),
    ]
    try:
        result = subprocess.run(
            command, input=probe_script(), capture_output=True, encoding="utf-8", errors="replace", timeout=timeout_s,
            check=False,
        )
    except FileNotFoundError as exc:
        raise R1FleetError(f"cannot run {ssh!r}: {exc}", host=who, field="ssh",
                           fix="install an OpenSSH client (apt-get install openssh-client)") from exc
    except subprocess.TimeoutExpired as exc:
        raise R1FleetError(f"the probe did not finish within {timeout_s} s", host=who, field="ssh",
                           fix="check that the host is reachable and not hung (a stuck nvidia-smi?)") from exc
    if result.returncode != 0:
        detail = (probe_text(result.stderr).strip().splitlines() or ["no error output"])[-1]
        raise R1FleetError(
            f"ssh failed with exit status {result.returncode}: {detail}", host=who, field="ssh",
            fix=f"make `{check}` work (address, user, key, ~/.ssh/config)",
        )
    if "#### r1fleet:" not in result.stdout:
        raise R1FleetError("the host answered but printed no probe document", host=who, field="probe",
                           fix="check that the remote login shell runs commands (`sh -s` must read stdin)")
    return probe_text(result.stdout)


def probe_this_machine(model_dir: str = DEFAULT_MODEL_DIR, timeout_s: int = 120) -> str:
    """Run probe.sh on the machine r1fleet runs on (`r1fleet plan` with nothing to plan plans it, as llmfit does)."""
    try:
        result = subprocess.run(["sh", "-s", "--", model_dir], input=probe_script(), capture_output=True, text=True,
                                timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise R1FleetError(f"the probe of this machine did not run: {exc}", field="probe",
                           fix="run `sh r1fleet/probe/probe.sh` to see why") from None
    return result.stdout


def _shell_quote(text: str) -> str:
    """ssh joins its arguments into one remote shell line, so the model directory is quoted for it."""
    return "'" + text.replace("'", "'\\''") + "'"
