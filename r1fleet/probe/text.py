"""A probe document's text as r1fleet reads it, whichever way it came (the pyinfra fact, ssh, a saved file);
importable without pyinfra, so the hardware parsers take it from here."""

from __future__ import annotations

import re

# Control characters other than tab and newline (C0, DEL, C1): a host's text never needs them, and printed to
# a terminal they are commands to it (a GPU named "\x1b]0;...\x07\x1b[2J" retitles and clears the screen).
CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def probe_text(raw: str) -> str:
    r"""A probe document as r1fleet reads it, whichever way it came (the fact, ssh, a saved file): CRLF read as
    LF, and no control character but tab and newline, so nothing a host prints reaches a terminal as a command.

    >>> probe_text("#### r1fleet:nvidia\r\nRTX \x1b[2J4090\x07\n")
    '#### r1fleet:nvidia\nRTX [2J4090\n'
    """
    return CONTROLS.sub("", raw.replace("\r\n", "\n"))
