"""What installing captioner asks of a user's environment."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _requirements() -> dict[str, Requirement]:
    data = tomllib.loads(PYPROJECT.read_text())
    return {Requirement(r).name.lower(): Requirement(r) for r in data["project"]["dependencies"]}


def test_torch_is_a_tested_range_not_one_build():
    """Issue 8.18: an exact pin forces every user's environment onto one torch build."""
    requirements = _requirements()
    for name, tested in (("torch", "2.13.0"), ("torchvision", "0.28.0")):
        spec = requirements[name].specifier
        assert not any(s.operator in ("==", "===") for s in spec), f"{name} is pinned exactly: {spec}"
        assert spec.contains(tested), f"{name} {spec} excludes the tested {tested}"
        assert any(s.operator in ("<", "<=") for s in spec), f"{name} has no upper bound: {spec}"


def test_the_packages_captioner_imports_at_run_time_are_declared():
    requirements = _requirements()
    for name in ("pydantic", "pytz", "duckdb", "ray", "pyarrow", "click", "tqdm"):
        assert name in requirements, f"{name} is imported but not a dependency"
