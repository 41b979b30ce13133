"""What an official Ollama install looks like to the takeover (r1fleet/roles/ollama/official.py), read from the
takeover fact's output captured on a lab host (Debian forky, systemd 262) in each state
(tests/fixtures/ollama-official/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1fleet.render.systemd_unit import systemd_environment
from r1fleet.roles.ollama.official import (
    DEFAULT_STORE,
    OfficialOllama,
    parse_official,
    stores_to_adopt,
    unit_store,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ollama-official"
OWN_STORE = "/var/lib/r1fleet/models/ollama"


def captured(name: str) -> OfficialOllama:
    return parse_official((FIXTURES / name).read_text().splitlines())


def test_a_drop_in_store_is_where_the_models_are_taken_from():
    """install.sh's unit with `Environment="OLLAMA_MODELS=/srv/ollama models"` in override.conf."""
    found = captured("install-sh-drop-in.txt")
    assert found.unit_loaded and found.enabled and not found.masked
    assert found.store == "/srv/ollama models"
    assert found.drop_ins == ("/etc/systemd/system/ollama.service.d/override.conf",)
    assert found.own_unit_file == "/etc/systemd/system/ollama.service"
    assert found.libraries == ("/usr/local/lib/ollama",)
    assert stores_to_adopt(found, OWN_STORE) == ["/srv/ollama models", DEFAULT_STORE]


def test_a_manual_install_into_usr_is_found():
    """docs/linux.mdx's manual install: the archive unpacked into /usr, its unit without OLLAMA_MODELS, so the
    store is the unit user's home's (here r1fleet's own `ollama`, home /var/lib/ollama)."""
    found = captured("usr-manual.txt")
    assert found.binaries == ("/usr/bin/ollama",) and found.libraries == ("/usr/lib/ollama",)
    assert found.unit_loaded and not found.enabled
    assert found.store == "/var/lib/ollama/.ollama/models"


def test_a_masked_or_missing_unit_has_no_store_of_its_own():
    masked = captured("masked.txt")
    assert masked.masked and masked.store is None and masked.own_unit_file is None
    assert stores_to_adopt(masked, OWN_STORE) == [DEFAULT_STORE]
    none = captured("none.txt")
    assert none.load_state == "not-found" and not none.masked and none.store is None and not none.binaries


def test_the_store_follows_ollamas_own_rules():
    # a quoted value with a blank, as systemctl show prints it; the last assignment wins
    assert systemd_environment('PATH=/usr/bin "OLLAMA_MODELS=/srv/a b" X=1 X=2') == {
        "PATH": "/usr/bin", "OLLAMA_MODELS": "/srv/a b", "X": "2"}
    # Var() trims blanks and then quotes (envconfig/config.go:375-377)
    assert unit_store({"OLLAMA_MODELS": " '/data/ollama/' "}, "/usr/share/ollama") == "/data/ollama"
    assert unit_store({}, "/usr/share/ollama") == DEFAULT_STORE
    assert unit_store({"HOME": "/home/me"}, "/usr/share/ollama") == "/home/me/.ollama/models"
    # a relative path depends on a working directory: not guessed
    assert unit_store({"OLLAMA_MODELS": "models"}, "/usr/share/ollama") is None
    assert systemd_environment('A="unbalanced B=2') == {"A": '"unbalanced', "B": "2"}


@pytest.mark.parametrize("store", [OWN_STORE, "/var/lib/r1fleet/models", "/var/lib/r1fleet/models/ollama/x", OWN_STORE + "/"])
def test_r1fleets_own_store_is_never_taken_from(store):
    found = OfficialOllama(load_state="loaded", store=store)
    assert stores_to_adopt(found, OWN_STORE) == [DEFAULT_STORE]


def test_only_ollamas_own_places_count_as_its_binaries():
    found = parse_official(["LoadState=loaded", "Binary=/usr/local/bin/ollama", "Binary=/tmp/ollama",
                            "Libraries=/etc", "Home=/usr/share/ollama", "garbage"])
    assert found.binaries == ("/usr/local/bin/ollama",) and found.libraries == ()
    assert found.store == DEFAULT_STORE
