"""The lab as an r1fleet plug-in (entry point `r1fleet.plugins: lab`): `--fleet lab`, the `lab:` section of a
lab fleet file, the lab's lock, the RPC devices that stand in for a lab host's GPUs, and `r1fleet lab ...`.
r1fleet reaches the lab only through this object (r1fleet/fleet/plugins.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from r1fleet.errors import R1FleetError
from r1fleet.lab import commands, network, paths, state


class LabPlugin:
    name = "lab"

    def fleet_file(self, require_up: bool) -> Path:
        if require_up and not any(h.get("state") == "up" for h in state.lab_hosts()):
            raise R1FleetError("the lab is not up", fix="run `r1fleet lab up` as root first")
        return paths.LAB_FLEET_FILE

    def connection_defaults(self, raw: Any, source: str) -> dict[str, dict] | None:
        if not (isinstance(raw, dict) and "lab" in raw):
            return None
        try:
            return state.connection_defaults(raw)
        except network.NetworkError as err:
            raise R1FleetError(f"{source}: field lab.subnet: {err}") from None

    def lock_path(self, fleet_file: Path) -> Path | None:
        """The lab's fleet file ships inside the package: its lock goes beside the link inventory/lab.yml in a
        checkout, else into the lab's cache directory."""
        if fleet_file.resolve() != paths.LAB_FLEET_FILE.resolve():
            return None
        inventory = paths.PACKAGE_DIR.parents[1] / "inventory"
        return (inventory if inventory.is_dir() else paths.CACHE_DIR) / "lab.yml.lock"

    def gpu_devices(self, plan: Any, settings: Any) -> list[str]:
        """A lab host (a hardware profile) runs one ggml-rpc-server per simulated GPU (r1fleet/lab/image.py)."""
        if settings.profile is None or not plan.uses_gpu:
            return []
        return [f"127.0.0.1:{paths.GPU_RPC_BASE_PORT + index}" for index in plan.gpu_indices]

    def register(self, subparsers: Any) -> None:
        commands.register(subparsers)


plugin = LabPlugin()
