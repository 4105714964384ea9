"""The lab extra (scipy, scikit-learn, matplotlib): named with its install command when missing, and never
needed by the demo, which a base install runs."""

from __future__ import annotations

import sys

import pytest

from pipeline.lab.demo import run_demo
from pipeline.lab.extra import LAB_PACKAGES, LabExtraMissing, missing_lab_packages, require_lab_extra
from pipeline.lab.training import TrainConfig


def block(monkeypatch, *roots: str) -> None:
    """Makes every import of these packages fail, as on an install without them (loaded submodules included)."""
    for name in [name for name in sys.modules if name.split(".")[0] in roots]:
        monkeypatch.setitem(sys.modules, name, None)
    for root in roots:
        monkeypatch.setitem(sys.modules, root, None)


def test_with_the_extra_installed_nothing_is_missing():
    assert missing_lab_packages() == []
    require_lab_extra("item eval")


def test_a_missing_package_is_named_with_the_install_command(monkeypatch):
    block(monkeypatch, "sklearn")
    assert missing_lab_packages() == ["scikit-learn"]
    with pytest.raises(LabExtraMissing) as caught:
        require_lab_extra("item eval")
    assert caught.value.code == "lab.extra_missing"
    assert str(caught.value) == (
        "item eval needs the lab extra (scikit-learn missing): pip install 'item-moderation[lab]'"
    )


def test_every_package_of_the_extra_is_checked(monkeypatch):
    block(monkeypatch, *LAB_PACKAGES)
    assert missing_lab_packages() == ["scipy", "scikit-learn", "matplotlib"]


def test_the_demo_runs_without_the_lab_extra(tiny_store, tmp_path, monkeypatch):
    block(monkeypatch, *LAB_PACKAGES)
    report = run_demo(tmp_path, tiny_store, per_family=4, train=TrainConfig(epochs=2, hidden=8))
    assert len(report.test) == 4 and report.head_path.is_file()
    assert 0.0 <= report.accuracy <= 1.0
