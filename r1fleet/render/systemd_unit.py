"""r1fleet's systemd units: the template's variables, escaped as systemd reads them, and the devices a plan needs.
Every other value of the template is escaped on its way in (r1fleet/render/formats.py `unit_text`)."""

from __future__ import annotations

import math
import shlex
from typing import Any

from r1fleet.fleet.config import HostConfig
from r1fleet.plan.memory import constants
from r1fleet.records import HostPlan
from r1fleet.render.formats import UnitText

UNIT_DIR = "/etc/systemd/system"
OLLAMA_UNIT = "r1fleet-ollama.service"
OLLAMA_PRELOAD_UNIT = "r1fleet-ollama-preload.service"  # loads its model after every start
LLAMA_UNIT = "r1fleet-llama-server.service"


# ---------------------------------------------------------------------------------------------
# What a plan needs from the host


def health_timeout_s(plan: HostPlan) -> int:
    """How long the start-up health gate waits: a base time plus reading the model from a slow disk."""
    c = constants()
    size = plan.gguf.size_bytes if plan.gguf and plan.gguf.size_bytes else 0
    return c.health_base_s + math.ceil(size / (c.health_disk_read_mb_per_s * 1_000_000))


def device_allow(plan: HostPlan) -> list[str]:
    """DeviceAllow= entries: only the GPU device classes the plan uses (names from /proc/devices)."""
    if not plan.uses_gpu:
        return []
    if plan.vendor == "nvidia":  # CUDA opens /dev/nvidia*, never /dev/dri
        return ["char-nvidia-frontend rw", "char-nvidia-uvm rw", "char-nvidia-caps r"]
    if plan.vendor == "amd":  # by device class: a path rule is skipped when /dev/kfd appears after the start
        return ["char-kfd rw", "char-drm rw"]
    if plan.vendor == "intel":
        return ["char-drm rw"]
    return []


class UnitSpecifier(str):
    """A word r1fleet writes with a systemd specifier on purpose (`%d/api-key`): kept as it is in a unit."""


def command_line(words: list[str]) -> UnitText:
    """An Exec*= command line, word by word as systemd reads it back (empty when there are no words)."""
    return UnitText(" ".join(systemd_word(word) for word in words))


def systemd_word(value: str) -> str:
    """One ExecStart= word as systemd reads it back as `value` (systemd.service "Command lines",
    systemd.unit "Specifiers"): `%` is a specifier and `$` a variable unless doubled, and quotes,
    backslashes and whitespace end or change a word, so they are escaped inside double quotes.

    >>> systemd_word("/models/a b%1.gguf")
    '"/models/a b%%1.gguf"'
    """
    if isinstance(value, UnitSpecifier):
        return str(value)
    escaped = _quoted_text(value).replace("$", "$$")
    plain = escaped == value and value and not any(c.isspace() or c in "'\\;" for c in value)
    return value if plain else f'"{escaped}"'


def environment_assignment(key: str, value: str) -> UnitText:
    """The text between the quotes of `Environment="KEY=VALUE"` that systemd reads back as exactly that
    one assignment (a `"` in a value would otherwise end it and start another, audit L3)."""
    return UnitText(f"{key}={_quoted_text(value)}")


def systemd_environment(value: str) -> dict[str, str]:
    """The `Environment=` property as `systemctl show -p Environment --value` prints it back: assignments separated
    by blanks, one holding a blank in double quotes (`PATH=/usr/bin "OLLAMA_MODELS=/srv/my models"`); the last
    assignment of a name wins, as in systemd."""
    try:
        words = shlex.split(value)
    except ValueError:  # an unbalanced quote: the plain words are the best reading
        words = value.split()
    env: dict[str, str] = {}
    for word in words:
        name, sep, text = word.partition("=")
        if sep and name:
            env[name] = text
    return env


def _quoted_text(value: str) -> str:
    return (value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
            .replace("\n", "\\n").replace("\t", "\\t"))


def unit_context(
    plan: HostPlan,
    settings: HostConfig,
    *,
    description: str,
    user: str,
    exec_start: list[str],
    environment: dict[str, str],
    read_write_paths: list[str],
    read_only_paths: list[str] = (),
    restrict_ip: bool,
    credential: str | None = None,
    exec_start_post: list[str] = (),
    timeout_start_s: int | None = None,
    exec_start_pre: list[str] = (),
    requires: list[str] = (),
    wants: list[str] = (),
    ip_allow: list[str] | None = None,
    restart_always: bool = False,
) -> dict[str, Any]:
    """Template variables for operations/templates/r1fleet-service.j2.

    exec_start_pre: one command run (as the service user, inside its sandbox) before each start, e.g. a pool head
    waiting for its workers; requires: units this one starts only with and after (a firewall); wants: units started
    with it that order themselves after it (the model's preload); ip_allow: the addresses the unit may talk to,
    instead of those of the serving API (service_ip_allow); restart_always: restart it whenever it ends, without a
    start limit, for a program that exits 0 when it failed to start serving."""
    gpu = plan.uses_gpu
    if ip_allow is None:
        ip_allow = service_ip_allow(settings) if restrict_ip else []
    return {
        "description": description,
        "user": user,
        "exec_start": command_line(exec_start),
        "exec_start_post": command_line(exec_start_post),
        "exec_start_pre": command_line(exec_start_pre),
        "requires": list(requires),
        "wants": list(wants),
        "timeout_start_s": timeout_start_s,
        "environment": [environment_assignment(key, value) for key, value in sorted(environment.items())],
        "read_write_paths": list(read_write_paths),
        "read_only_paths": list(read_only_paths),
        "device_allow": device_allow(plan),
        "gpu": gpu,
        # CUDA's driver and HIP map JIT-compiled kernels writable+executable, which
        # MemoryDenyWriteExecute forbids; it is only safe for CPU-only services.
        "memory_deny_write_execute": not gpu,
        "load_nvidia_uvm": gpu and plan.vendor == "nvidia" and plan.placement != "unified",
        "ip_allow": list(ip_allow),
        "restrict_ip": restrict_ip,
        "credential": credential,
        "restart_always": restart_always,
    }


def service_ip_allow(settings: HostConfig) -> list[str]:
    """IPAddressAllow= of a serving unit: loopback, and when exposed its own address and the allow-list."""
    ip_allow = ["localhost"]
    if not settings.local_only:
        # The deploy's health check and verify's on-host requests come from the host's own LAN address.
        own = [] if settings.listen in ("0.0.0.0", "::") else [settings.listen]
        ip_allow += [*own, *settings.allow]
    return ip_allow
