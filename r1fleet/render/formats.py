"""One escaping layer per file format r1fleet writes on a host, applied by construction: every `{{ value }}` of a
template passes through its format's `finalize` (Jinja calls it on each expression's result), so a value can
neither add a line nor a directive even where a validator upstream missed it.

- systemd units: a line ends at a newline, and `%` starts a specifier (systemd.unit "Specifiers"): control
  characters are refused, `%` doubled. Text already written in unit syntax (an ExecStart= command line built
  word by word by `systemd_word`, an `Environment=` assignment) is marked `UnitText` and kept as it is.
- nftables files: a newline or `;` ends a statement, `#` starts a comment, `"` a string: a value is one token
  of addresses, ports and names, so anything outside `A-Z a-z 0-9 . : / , _ -` and the space is refused.
- launchd property lists (XML): Jinja's XML escaping (`autoescape`), control characters refused (XML 1.0
  allows none but tab and newline, which no plist value of r1fleet's needs).
- HAProxy configuration: a newline ends a statement, a space ends a word, `#` starts a comment, `"` and a
  backslash escape and `$` expands an environment variable inside double quotes (HAProxy's configuration manual,
  its part on quoting and escaping; checked with Debian 12's `haproxy -c` in tests/unit/test_gateway.py). A value
  of plain characters is written as it is; any other goes in single quotes, inside which HAProxy neither escapes
  nor expands anything; a value holding a `'` or a control character is refused.

The settings go to pyinfra's `files.template(..., jinja_env_kwargs=...)`:

    files.template(src="unit.j2", dest=..., jinja_env_kwargs=unit_settings(), svc=context)
"""

from __future__ import annotations

import re
from typing import Any

from r1fleet.errors import R1FleetError

WHITESPACE = {"trim_blocks": True, "lstrip_blocks": True}
NFT_TOKEN = re.compile(r"^[A-Za-z0-9 .:/,_-]*$")
HAPROXY_WORD = re.compile(r"^[A-Za-z0-9.:/,_@+=-]+$")


class RenderError(R1FleetError):
    """A value that cannot be written into a file of this format without changing the file's meaning."""


class UnitText(str):
    """Text already in systemd unit syntax (escaped word by word): written into a unit as it is."""


class HaproxyText(str):
    """A word r1fleet writes in HAProxy's syntax on purpose (an environment variable in double quotes): kept as it is."""


def _control_characters(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def unit_text(value: Any) -> str:
    """A value as a systemd unit line holds it.

    >>> unit_text("GPU 100%"), unit_text(UnitText('"/a b"')), unit_text(300)
    ('GPU 100%%', '"/a b"', '300')
    """
    if isinstance(value, UnitText):
        return value
    text = str(value)
    if _control_characters(text):
        raise RenderError(f"{text!r} cannot be written into a systemd unit: it holds a line break or another "
                          "control character", fix="remove it from the fleet file, the host data or the lock")
    return text.replace("%", "%%")


def nft_text(value: Any) -> str:
    """A value as an nftables rule holds it: addresses, ports and names only.

    >>> nft_text("10.0.0.0/24, 192.168.1.5")
    '10.0.0.0/24, 192.168.1.5'
    """
    text = str(value)
    if not NFT_TOKEN.match(text):
        raise RenderError(f"{text!r} cannot be written into an nftables rule: only addresses, ports and names "
                          "(letters, digits, '.', ':', '/', ',', '_', '-')", fix="correct the value in the fleet file")
    return text


def plist_text(value: Any) -> Any:
    """A value as a launchd property list holds it (Jinja escapes it for XML afterwards)."""
    if _control_characters(str(value)):
        raise RenderError(f"{str(value)!r} cannot be written into a property list: it holds a control character",
                          fix="remove it from the fleet file or the host data")
    return value


def haproxy_text(value: Any) -> str:
    """A value as one word of an HAProxy configuration line.

    >>> haproxy_text("deepseek-r1:32b-qwen-distill-q4_K_M"), haproxy_text("Bearer a#b$c")
    ('deepseek-r1:32b-qwen-distill-q4_K_M', "'Bearer a#b$c'")
    """
    if isinstance(value, HaproxyText):
        return value
    text = str(value)
    if HAPROXY_WORD.match(text):
        return text
    if "'" in text or _control_characters(text) or not text:
        raise RenderError(f"{text!r} cannot be written into an HAProxy configuration as one word: it is empty or holds "
                          "a single quote or a control character", fix="correct the value (a key: write a new one)")
    return f"'{text}'"


def unit_settings(whitespace: bool = True) -> dict[str, Any]:
    """Jinja settings of a systemd unit template (`whitespace`: trim the lines of block tags)."""
    return {**(WHITESPACE if whitespace else {}), "finalize": unit_text}


def nft_settings(whitespace: bool = True) -> dict[str, Any]:
    return {**(WHITESPACE if whitespace else {}), "finalize": nft_text}


def haproxy_settings(whitespace: bool = True) -> dict[str, Any]:
    return {**(WHITESPACE if whitespace else {}), "finalize": haproxy_text}


def plist_settings() -> dict[str, Any]:
    return {"autoescape": True, "finalize": plist_text}
