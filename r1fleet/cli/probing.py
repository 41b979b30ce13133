"""The probe documents of a fleet's hosts, for `r1fleet plan --fleet` and `r1fleet lock`: over SSH in parallel,
or from saved probes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from r1fleet.errors import R1FleetError
from r1fleet.lock.match import relock_fleet
from r1fleet.plan.policy import Policy
from r1fleet.probe.facts import probe_over_ssh


def fleet_probes(fleet, hosts: list[str] | tuple[str, ...] = (), probe_dir: Path | None = None,
                 ) -> list[tuple[str, str, Policy, object]]:
    """(host, probe text, policy, fleet entry) for the fleet's hosts (all, or those named): probed over SSH
    in parallel, or read from `probe_dir`/HOST.probe (saved probes: offline, and tests without SSH). The first host
    that cannot be probed stops it (R1FleetError naming that host)."""
    results = fleet_probe_results(fleet, hosts, probe_dir)
    for _host, text, _policy, _entry in results:
        if isinstance(text, R1FleetError):
            raise text
    return results  # type: ignore[return-value]


def fleet_probe_results(fleet, hosts: list[str] | tuple[str, ...] = (), probe_dir: Path | None = None,
                        ) -> list[tuple[str, str | R1FleetError, Policy, object]]:
    """As fleet_probes, each host with its probe document or the error (naming it by its fleet name) that kept
    it from being probed: one host down leaves the others' documents."""
    unknown = [h for h in hosts if h not in fleet.hosts]
    if unknown:
        raise R1FleetError(f"not in {fleet.source}", host=unknown[0], fix=f"use one of: {', '.join(fleet.hosts)}")
    if probe_dir is not None and not probe_dir.is_dir():
        raise R1FleetError(f"{probe_dir} is not a directory", field="--probe-dir",
                           fix="give the directory of saved probes (DIR/HOST.probe, from `r1fleet probe --fleet F HOST`)")
    entries = [fleet.hosts[h] for h in dict.fromkeys(hosts)] if hosts else list(fleet.hosts.values())
    ref = relock_fleet(fleet.source)
    read = (lambda e: _saved_probe(probe_dir, e.name, ref)) if probe_dir is not None else _probe
    with ThreadPoolExecutor(max_workers=min(16, len(entries))) as pool:
        texts = list(pool.map(lambda e: _or_error(read, e), entries))
    return [(e.name, t, e.policy, e) for e, t in zip(entries, texts)]


def _or_error(read, entry) -> str | R1FleetError:
    try:
        return read(entry)
    except R1FleetError as err:
        return err


def _probe(entry) -> str:
    return probe_over_ssh(entry.address, **ssh_options(entry), name=entry.name)


def _saved_probe(probe_dir: Path, host: str, fleet: str) -> str:
    path = probe_dir / f"{host}.probe"
    try:
        return path.read_text(errors="replace")  # a stray byte is the parser's to judge, not a crash
    except OSError as err:
        raise R1FleetError(f"{path}: cannot read ({err.strerror})", host=host,
                           fix=f"save it with `r1fleet probe --fleet {fleet} {host} > {path}`") from None


def ssh_options(entry) -> dict:
    """SSH settings of a fleet host, in the keyword form `probe_over_ssh` takes."""
    return {"model_dir": entry.model_dir, "extra_args": entry.ssh_args()}
