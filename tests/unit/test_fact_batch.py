"""One round trip for many facts: the batch must answer exactly what each fact answers on its own.

Runs real pyinfra and r1fleet facts through this machine's `sh`, one by one and as one batch, on real
files (a temporary tree), and compares the processed values.
"""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest
from pyinfra.api import FactBase
from pyinfra.facts.files import Directory, File, Link, Sha1File
from pyinfra.facts.server import Which

from r1fleet.operations.common import SystemAccount, VerifiedDigest, stamp_command
from r1fleet.operations.fact_batch import FactBatch, _as_pyinfra_reads, fact_command, split_batch_output
from r1fleet.roles.ollama.role import DirEntries, JsonFile


class NoNewline(FactBase):
    """Prints its answer without a final newline, as curl does with JSON."""

    def command(self) -> str:
        return "printf '{\"a\": 1}'"


class Fails(FactBase):
    def command(self) -> str:
        return "echo partial; exit 3"


class Exits(FactBase):
    """`exit` inside a fact must end only that fact, not the batch."""

    def command(self) -> str:
        return "echo early; exit 0; echo never"


def alone(cls: type[FactBase], kwargs: dict) -> tuple[bool, object]:
    """(servable, value) of the fact run on its own, processed as pyinfra 3.10 processes it."""
    fact = cls()
    command, requires = fact_command(fact, kwargs)
    if requires and subprocess.run(["sh", "-c", f"command -v {requires}"], capture_output=True).returncode:
        return False, None
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True)
    if result.returncode:
        return False, None
    lines = result.stdout.splitlines()
    return True, fact.process(lines) if lines else fact.default()


def batched(requests: list[tuple[type[FactBase], dict]]) -> list[tuple[bool, object]]:
    facts = [cls() for cls, _ in requests]
    script = FactBatch().command(commands=tuple(fact_command(fact, kwargs) for fact, (_, kwargs) in zip(facts, requests)))
    output = subprocess.run(["sh", "-c", script], capture_output=True, text=True).stdout.splitlines()
    frames = FactBatch().process(output)
    return [_as_pyinfra_reads(fact, *frames[index]) if index in frames else (False, None)
            for index, fact in enumerate(facts)]


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "unit.service").write_text("[Unit]\nDescription=x\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "a.gguf").write_bytes(b"GGUF" * 1000)
    (tmp_path / "record.json").write_text('{"tag": "x"}')
    os.symlink(tmp_path / "unit.service", tmp_path / "link")
    # Access times an hour after the change: relatime then leaves them alone, so a fact's read of a file
    # cannot move the access time the next fact reports (a flake whenever the clock turned a second between).
    for path in [tmp_path, *tmp_path.rglob("*")]:
        info = path.lstat()
        os.utime(path, (info.st_mtime + 3600, info.st_mtime), follow_symlinks=False)
    return tmp_path


def test_the_batch_answers_what_each_fact_answers(tree):
    gguf = tree / "models" / "a.gguf"
    subprocess.run(["sh", "-c", stamp_command(str(gguf), hashlib.sha256(gguf.read_bytes()).hexdigest())], check=True)
    requests = [
        (File, {"path": str(tree / "unit.service")}), (File, {"path": str(tree / "absent")}),
        (Directory, {"path": str(tree / "models")}), (Link, {"path": str(tree / "link")}),
        (Sha1File, {"path": str(tree / "unit.service")}), (Which, {"command": "sh"}),
        (Which, {"command": "no-such-binary-r1fleet"}), (SystemAccount, {"account": "root"}),
        (SystemAccount, {"account": "no-such-user-r1fleet"}), (VerifiedDigest, {"path": str(gguf)}),
        (VerifiedDigest, {"path": str(tree / "unit.service")}), (DirEntries, {"path": str(tree / "models")}),
        (JsonFile, {"path": str(tree / "record.json")}), (NoNewline, {}), (Fails, {}), (Exits, {}),
    ]
    expected = [alone(cls, kwargs) for cls, kwargs in requests]
    assert batched(requests) == expected
    assert expected[-2] == (False, None)  # a failing fact is read again by pyinfra, never served
    assert expected[-3] == (True, '{"a": 1}') and expected[-1] == (True, "early")
    assert expected[9][1] == ("stamped", hashlib.sha256(gguf.read_bytes()).hexdigest())
    assert expected[10][1][0] == "hashed"


def test_a_stamp_no_longer_matches_a_rewritten_file(tree):
    gguf = tree / "models" / "a.gguf"
    subprocess.run(["sh", "-c", stamp_command(str(gguf), "0" * 64)], check=True)
    gguf.write_bytes(b"GGUF" * 1001)
    (value,) = [v for _, v in batched([(VerifiedDigest, {"path": str(gguf)})])]
    assert value == ("hashed", hashlib.sha256(gguf.read_bytes()).hexdigest())


def test_an_unclosed_frame_is_not_an_answer():
    assert split_batch_output(["R1FLEET-FACT-BATCH-5b7e 0", "half"]) == {}
