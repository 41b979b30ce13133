"""The disk a deploy writes, checked before any download (r1fleet/artifacts/disk.py): the model into model_dir
and the Ollama release unpacked under /opt/r1fleet, each against its filesystem's free space from the probe,
the two adding up where they share a filesystem. Hosts from captured probe documents (tests/fixtures/probes/),
their `df-install` and `releases` sections as the probe prints them (df -Pk captured on this controller)."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1fleet.artifacts.disk import check_disks, disk_uses, release_mib
from r1fleet.artifacts.ollama_release import host_release
from r1fleet.artifacts.pins import load_pins, platform_from_hardware
from r1fleet.deploy.refusals import deploy_refusal
from r1fleet.errors import DeployError, ProbeError
from r1fleet.fleet.config import HostConfig
from r1fleet.hardware import parse_probe
from r1fleet.hardware.system import parse_disk, parse_installed_releases
from r1fleet.lock.served import served_alone
from r1fleet.plan.memory import constants
from r1fleet.plan.policy import Policy

PROBES = Path(__file__).resolve().parents[1] / "fixtures" / "probes"
MODELS = "/var/lib/r1fleet/models"
DF_OPT = ["Filesystem     1024-blocks     Used Available Capacity Mounted on",
          "/dev/vda         264212084 33015276  {free} 32% {mount}"]


def with_install_disk(name: str, free_kib: int, mount: str = "/opt", releases: tuple[str, ...] = ()) -> str:
    """A captured probe with the sections the probe now prints for /opt/r1fleet."""
    text = (PROBES / name).read_text().rstrip("\n")
    df = "\n".join(DF_OPT).format(free=free_kib, mount=mount)
    return f"{text}\n#### r1fleet:df-install\n{df}\n#### r1fleet:releases\n" + "".join(f"{r}\n" for r in releases)


def test_the_probe_sections_are_read():
    assert parse_disk(["Filesystem     1024-blocks     Used Available Capacity Mounted on",
                       "/dev/vda         264212084 33015276  73375636      32% /"]).model_dump() == {"mount": "/", "free_mib": 71655}
    assert parse_disk(["Filesystem 1024-blocks Used Available Capacity Mounted on", "x 1 1 nan 1% /"]) is None
    assert parse_disk([]) is None
    stamp = "/opt/r1fleet/ollama/0.32.9/.r1fleet-installed-0123456789abcdef"
    assert parse_installed_releases([stamp, "/etc/passwd", "/opt/r1fleet/ollama/../x/.r1fleet-installed-0"]) == [stamp]
    hw = parse_probe(with_install_disk("cpu-16g.probe", 5_000_000, releases=(stamp,)), "cpu")
    assert hw.install_disk.mount == "/opt" and hw.install_disk.free_mib == 4882 and hw.installed_releases == [stamp]
    assert hw.model_mount == "/"
    old = parse_probe((PROBES / "cpu-16g.probe").read_text(), "cpu")  # a probe from before: nothing to check
    assert old.install_disk is None and old.installed_releases == []
    # a number no disk has is a clear error naming the host and the section, never a traceback
    with pytest.raises(ProbeError, match="df-install"):
        parse_probe(with_install_disk("cpu-16g.probe", 10**25), "cpu")


def test_the_pinned_sizes_are_the_releases():
    """amd64: 1,421,653,242 B unpacking to 2,245,353,064 B; the ROCm add-on 1,047,461,645 B to 2,594,730,880 B."""
    ollama = load_pins().ollama
    amd64, rocm = "ollama-linux-amd64.tar.zst", "ollama-linux-amd64-rocm.tar.zst"
    assert ollama.install_bytes(amd64, ollama.sha256[amd64]) == 1_421_653_242 + 2_245_353_064
    assert ollama.install_bytes(rocm, ollama.sha256[rocm]) == 1_047_461_645 + 2_594_730_880
    # other bytes under the pinned name (the lab's stand-in, a host's own release): no size known, none counted
    assert ollama.install_bytes(amd64, "0" * 64) == 0
    # a pinned asset without a size record counts as the largest recorded
    arm64 = "ollama-linux-arm64.tar.zst"
    assert ollama.install_bytes(arm64, ollama.sha256[arm64]) == 1_421_653_242 + 2_245_353_064


def ollama_host(probe: str, free_kib: int, mount: str = "/opt", releases: tuple[str, ...] = (), **settings):
    text = with_install_disk(probe, free_kib, mount, releases)
    hw = parse_probe(text, "h1")
    entry = HostConfig(name="h1", address="10.0.0.1", **settings)
    served = served_alone(entry, hw, None)
    return served, entry, hw


def test_a_runtime_that_does_not_fit_under_opt_is_refused_naming_the_filesystem():
    served, entry, hw = ollama_host("cpu-16g.probe", 2_000_000)  # 1,953 MiB free on /opt
    assert served.plan.backend == "ollama"
    release = host_release(served.plan, entry, platform_from_hardware(hw))
    assert release_mib(release, hw) == 3498  # (1,421,653,242 + 2,245,353,064) B in MiB, rounded up
    error = deploy_refusal(served, entry, hw)
    assert isinstance(error, DeployError)
    message = str(error)
    assert "the filesystem at /opt needs 3,498 MiB for Ollama 0.32.9" in message and "in /opt/r1fleet" in message
    assert "1,953 MiB are free" in message and "field disk" in message and "free space on /opt" in message
    # installed already (its stamp found by the probe): nothing to unpack, nothing refused
    served, entry, hw = ollama_host("cpu-16g.probe", 2_000_000, releases=(release.stamp,))
    assert deploy_refusal(served, entry, hw) is None
    # room enough: not refused
    served, entry, hw = ollama_host("cpu-16g.probe", 6_000_000)
    assert deploy_refusal(served, entry, hw) is None


def test_the_model_and_the_runtime_on_one_filesystem_add_up():
    """Each fits alone on / ; together they do not."""
    served, entry, hw = ollama_host("cpu-16g.probe", 10**9, mount="/")
    uses = disk_uses(served.plan, hw, MODELS, release=host_release(served.plan, entry, platform_from_hardware(hw)))
    model, runtime = (use.need_mib for use in uses)
    margin = constants().disk_margin_mib
    free = max(model, runtime) + margin + 1  # enough for either alone
    assert free < model + runtime + margin
    tight = hw.model_copy(update={"disk_free_mib": free, "install_disk": hw.install_disk.model_copy(update={"free_mib": free})})
    with pytest.raises(DeployError) as error:
        check_disks("h1", served.plan, tight, MODELS, release=host_release(served.plan, entry, platform_from_hardware(hw)))
    message = str(error.value)
    assert f"the filesystem at / needs {model + runtime:,} MiB for the model" in message and " and Ollama 0.32.9" in message
    assert "set model_dir to a directory on another disk than /opt/r1fleet" in message
    # the same free space on two filesystems: each fits
    apart = tight.model_copy(update={"model_mount": "/srv"})
    check_disks("h1", served.plan, apart, MODELS, release=host_release(served.plan, entry, platform_from_hardware(hw)))


def test_a_llama_cpp_host_counts_the_release_it_takes_llama_server_from():
    """Ubuntu offers no llama.cpp package: llama-server comes from the pinned Ollama archive, unpacked under /opt."""
    served, entry, hw = ollama_host("dual-rtx3090.probe", 2_000_000, policy=Policy(backend="llama.cpp"))
    assert served.plan.backend == "llama.cpp"
    error = deploy_refusal(served, entry, hw)
    assert isinstance(error, DeployError) and "the filesystem at /opt needs 3,498 MiB for Ollama 0.32.9" in str(error)
