"""The `lab` extra: scipy, scikit-learn and matplotlib, which training, evaluation and calibration need and the
detector, the demo and the service do not (`pip install 'item-moderation[lab]'`).

Every import of them stays inside the function that needs it. A command that needs them checks first, by looking
the packages up without importing them (scipy and scikit-learn are slow to import), so a missing one is a clear
error before any model loads, not a traceback after a long extraction.
"""

from __future__ import annotations

import importlib.util

from pipeline.core.errors import ItemError

LAB_PACKAGES = {"scipy": "scipy", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}  # module: distribution
INSTALL = "pip install 'item-moderation[lab]'"


class LabExtraMissing(ItemError):
    """A command of the lab was run on an install without the lab extra."""

    code = "lab.extra_missing"


def missing_lab_packages() -> list[str]:
    """The lab extra's packages that cannot be imported here (by distribution name), in a fixed order."""
    missing = []
    for module, package in LAB_PACKAGES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken install, or a module set to None in sys.modules
            found = False
        if not found:
            missing.append(package)
    return missing


def require_lab_extra(command: str) -> None:
    """Raises LabExtraMissing, naming the install command, unless every package of the lab extra is there."""
    missing = missing_lab_packages()
    if missing:
        raise LabExtraMissing(f"{command} needs the lab extra ({', '.join(missing)} missing): {INSTALL}")
