"""An official Ollama install on a host, read from what systemd and the file system say: its unit (install.sh's or
one written by hand as docs/linux.mdx shows), where that unit keeps its models, its binaries and libraries.
Pure (no pyinfra): the takeover (takeover.py) reads the fact's text through `parse_official`.

Where Ollama v0.32.9 looks, each from its own source:
- install.sh unpacks the release into the parent of the first of /usr/local/bin, /usr/bin, /bin on PATH
  (scripts/install.sh:159-171), so the binary is `<prefix>/bin/ollama`, a regular file, and the runners are in
  `<prefix>/lib/ollama`; the manual install unpacks into /usr (docs/linux.mdx:22-25).
- Both write /etc/systemd/system/ollama.service running `ollama serve` as user `ollama`, home /usr/share/ollama
  (install.sh:197-230, linux.mdx:59-83); a change goes in a drop-in, `systemctl edit ollama` or
  /etc/systemd/system/ollama.service.d/override.conf (linux.mdx:123-136).
- The store is OLLAMA_MODELS, else `$HOME/.ollama/models` (envconfig/config.go:111-124), OLLAMA_MODELS set in the
  unit's environment (docs/faq.mdx:233-245); the value is trimmed of blanks and then of quotes
  (envconfig/config.go:375-377, `Var`).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from r1fleet.render.systemd_unit import systemd_environment

UNIT = "ollama.service"
UNIT_DIR = "/etc/systemd/system"  # where install.sh and docs/linux.mdx write it; a packaged unit is elsewhere
DEFAULT_STORE = "/usr/share/ollama/.ollama/models"  # install.sh's user home (docs/faq.mdx:233-236)
BINARIES = ("/usr/local/bin/ollama", "/usr/bin/ollama")  # install.sh's prefix, the manual install's
LIBRARIES = ("/usr/local/lib/ollama", "/usr/lib/ollama")
# What the fact asks systemd about the unit (`systemctl show`, one `Key=value` line each).
UNIT_PROPERTIES = ("LoadState", "ActiveState", "UnitFileState", "FragmentPath", "DropInPaths", "User", "Environment")


@dataclass(frozen=True)
class OfficialOllama:
    """What is left of an official Ollama on a host.

    load_state: systemd's for ollama.service (`loaded`, `not-found`, `masked`, ...); store: where that unit's
    server keeps its models (None when no unit is loaded); binaries and libraries: regular files and folders
    at Ollama's own places (never r1fleet's link)."""

    load_state: str = "not-found"
    active: bool = False
    enabled: bool = False
    fragment: str = ""
    drop_ins: tuple[str, ...] = ()
    store: str | None = None
    binaries: tuple[str, ...] = ()
    libraries: tuple[str, ...] = ()

    @property
    def unit_loaded(self) -> bool:
        return self.load_state == "loaded"

    @property
    def masked(self) -> bool:
        return self.load_state == "masked"

    @property
    def own_unit_file(self) -> str | None:
        """The unit file install.sh or the manual install wrote, which `systemctl mask` needs out of its place
        (a packaged unit elsewhere is left alone: the mask in /etc hides it)."""
        if self.unit_loaded and posixpath.dirname(self.fragment) == UNIT_DIR:
            return self.fragment
        return None


def ollama_var(env: dict[str, str], name: str) -> str:
    """A variable as Ollama reads it: blanks trimmed, then quotes (envconfig/config.go:375-377)."""
    return env.get(name, "").strip().strip("\"'")


def unit_store(env: dict[str, str], user_home: str) -> str | None:
    """Where the unit's server keeps its models: OLLAMA_MODELS, else $HOME/.ollama/models, $HOME being the
    unit's own or its user's home (systemd sets it from User=). None when neither is an absolute path."""
    models = ollama_var(env, "OLLAMA_MODELS")
    if models:
        return posixpath.normpath(models) if models.startswith("/") else None
    home = env.get("HOME") or user_home
    return posixpath.join(posixpath.normpath(home), ".ollama", "models") if home.startswith("/") else None


def parse_official(lines: list[str]) -> OfficialOllama:
    """The fact's output: `systemctl show` lines of UNIT_PROPERTIES, then `Home=` (the unit user's home from
    getent), `Binary=` and `Libraries=` lines, one per path found."""
    values: dict[str, str] = {}
    binaries: list[str] = []
    libraries: list[str] = []
    for line in lines:
        key, sep, value = line.rstrip("\n").partition("=")
        if not sep:
            continue
        if key == "Binary" and value in BINARIES:
            binaries.append(value)
        elif key == "Libraries" and value in LIBRARIES:
            libraries.append(value)
        elif key in (*UNIT_PROPERTIES, "Home"):
            values[key] = value.strip()
    load_state = values.get("LoadState") or "not-found"
    store = None
    if load_state == "loaded":
        store = unit_store(systemd_environment(values.get("Environment", "")), values.get("Home", ""))
    return OfficialOllama(
        load_state=load_state,
        active=values.get("ActiveState") in ("active", "activating", "reloading"),
        enabled=values.get("UnitFileState", "").startswith("enabled"),
        fragment=values.get("FragmentPath", ""),
        drop_ins=tuple(values.get("DropInPaths", "").split()),
        store=store,
        binaries=tuple(dict.fromkeys(binaries)),
        libraries=tuple(dict.fromkeys(libraries)),
    )


def stores_to_adopt(found: OfficialOllama, own_store: str) -> list[str]:
    """The stores whose models the takeover moves into r1fleet's (`own_store`): the unit's, and install.sh's
    default one (models stay there after its unit is gone); never r1fleet's own store or a folder around it."""
    own = posixpath.normpath(own_store)
    stores = []
    for store in (found.store, DEFAULT_STORE):
        if store is None:
            continue
        store = posixpath.normpath(store)
        if store == own or own.startswith(store.rstrip("/") + "/") or store.startswith(own + "/"):
            continue
        if store not in stores:
            stores.append(store)
    return stores
