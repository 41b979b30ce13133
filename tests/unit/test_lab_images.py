"""The lab's images per Debian release (issue 24): one cached image per suite, its key following the suite's recipe,
and a lab fleet file's `distro:` read and refused as every fleet field is.

Test doubles: debootstrap, the chroot post-build and the copy out of forky's image (root, network and a built
forky image, which the lab tests use: tests/lab/test_lab_distros.py) are replaced in the build-cleanup test only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest

from r1fleet.fleet.config import LabDistro
from r1fleet.fleet.file import load_fleet
from r1fleet.lab import image, paths, state

ROOT = Path(__file__).resolve().parents[2]
DISTROS_LAB = ROOT / "inventory/lab-distros.yml"


def test_the_images_are_the_releases_a_fleet_file_may_name():
    assert set(image.SUITES) == set(get_args(LabDistro))
    assert image.DEFAULT_SUITE == state.DEFAULT_DISTRO == "forky"


def test_each_release_has_its_own_image_and_recipe():
    keys = {suite: image.cache_key(suite) for suite in image.SUITES}
    assert len(set(keys.values())) == len(keys)
    for suite in image.SUITES:
        recipe = image.recipe(suite)
        assert recipe["suite"] == suite
        assert f"deb http://deb.debian.org/debian {suite} main contrib" in recipe["post_build"]
    # Debian's llama.cpp is forky's alone; the older releases carry forky's build instead of a package.
    assert "llama.cpp-tools" in image.recipe("forky")["packages"]
    for suite in ("bookworm", "trixie"):
        assert not any("llama" in package or "ggml" in package for package in image.recipe(suite)["packages"])
        assert image.recipe(suite)["carried_llama_cpp"]["from"] == image.cache_key("forky")
    # Only forky's Release file is past its Valid-Until date; the stable releases' are checked.
    assert "Check-Valid-Until" in image.post_build("forky")
    assert "Check-Valid-Until" not in image.post_build("bookworm")


def test_a_carrying_image_follows_the_forky_image_it_carries_from(monkeypatch):
    before = {suite: image.cache_key(suite) for suite in image.SUITES}
    forky = image.SUITES["forky"]
    monkeypatch.setitem(image.SUITES, "forky", image.Suite("forky", forky.packages + ("llama.cpp-tests",),
                                                           forky.carries_llama_cpp, forky.stale_release))
    for suite in image.SUITES:
        assert image.cache_key(suite) != before[suite], suite


def fake_image(images: Path, key: str, suite: str) -> Path:
    directory = images / key
    (directory / "rootfs").mkdir(parents=True)
    (directory / "recipe.json").write_text(json.dumps({"suite": suite}))
    (directory / "complete").touch()
    return directory


def test_a_new_image_replaces_only_its_own_release_and_never_one_in_use(tmp_path, monkeypatch):
    images = tmp_path / "images"
    monkeypatch.setattr(paths, "IMAGES_DIR", images)
    forky_now = fake_image(images, image.cache_key("forky"), "forky")
    trixie = fake_image(images, "aaaa", "trixie")
    old_bookworm = fake_image(images, "bbbb", "bookworm")
    running_bookworm = fake_image(images, "cccc", "bookworm")  # another checkout's lab host runs on it
    monkeypatch.setattr(image, "lower_dirs", lambda: {str(running_bookworm / "rootfs")})
    steps = []
    monkeypatch.setattr(image, "_run_logged", lambda argv, log, env, what: steps.append((what, argv)))
    monkeypatch.setattr(image, "carry_llama_cpp", lambda source, target, suite: steps.append(("carry", source)))

    root = image.build(tmp_path / "image.log", suite="bookworm")

    assert root == images / image.cache_key("bookworm") / "rootfs" and image.is_cached("bookworm")
    assert [what for what, _ in steps] == ["debootstrap", "post-build", "carry"]
    assert "bookworm" in steps[0][1] and steps[2][1] == forky_now / "rootfs"
    assert not old_bookworm.exists()
    assert forky_now.exists() and trixie.exists() and running_bookworm.exists()


def test_the_lab_file_gives_each_host_its_release(tmp_path):
    layout = state.read_lab_layout(DISTROS_LAB)
    assert {name: layout.distro(name) for name in layout.hosts} == {"lab-bookworm": "bookworm", "lab-trixie": "trixie"}
    fleet = load_fleet(DISTROS_LAB)
    assert {name: host.distro for name, host in fleet.hosts.items()} == {"lab-bookworm": "bookworm",
                                                                       "lab-trixie": "trixie"}
    default = state.read_lab_layout(paths.LAB_FLEET_FILE)
    assert {layout.distro(name) for name in default.hosts} == {"forky"}


@pytest.mark.parametrize("value", ["buster", "Bookworm", 12, ""])
def test_lab_up_refuses_a_release_it_has_no_image_for(tmp_path, value):
    bad = tmp_path / "lab.yml"
    bad.write_text(DISTROS_LAB.read_text().replace("distro: trixie", f"distro: {json.dumps(value)}"))
    with pytest.raises(state.LabLayoutError) as caught:
        state.read_lab_layout(bad)
    message = str(caught.value)
    assert "host lab-trixie: field distro:" in message and "fix: use one of bookworm, trixie, forky" in message
