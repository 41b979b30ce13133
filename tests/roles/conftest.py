import sys
from pathlib import Path

# deploy_harness and facts_for live beside the tests; make them importable without a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest


@pytest.fixture(autouse=True)
def _no_controller_cache(monkeypatch):
    """The fake hosts' artifacts are not fetched into this controller's cache (r1fleet/operations/fleet_cache.py):
    the role tests check what each host runs; the lab tests exercise the cache for real."""
    monkeypatch.setenv("R1FLEET_CACHE", "off")


@pytest.fixture(autouse=True)
def _no_registry(monkeypatch):
    """Nor is any Ollama registry read: an Ollama host's model is pulled (`ollama pull`), as when the controller
    cannot reach the registry; tests/roles/test_ollama_registry.py serves a registry of its own."""
    import r1fleet.cache.registry

    def unreachable(registry: str, tag: str) -> bytes:
        raise OSError(f"{registry}: no registry is reachable from the role tests")
    monkeypatch.setattr(r1fleet.cache.registry, "fetch_manifest", unreachable)
