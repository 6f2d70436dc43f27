"""What installing captioner asks of a user's environment, and what it ships."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
FIRST_PARTY = {"pipeline", "jobs", "schemas"}


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def _requirements(extras: bool = False) -> dict[str, Requirement]:
    data = _project()["project"]
    listed = list(data["dependencies"])
    if extras:
        listed += [r for group in data["optional-dependencies"].values() for r in group]
    return {Requirement(r).name.lower().replace("_", "-"): Requirement(r) for r in listed}


def _shipped_files() -> list[Path]:
    """Every .py file the wheel installs: the packages pyproject's find directive selects."""
    find = _project()["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT), include=find["include"])
    files = []
    for package in packages:
        folder = ROOT / package.replace(".", "/")
        files += sorted(folder.glob("*.py"))
    return files


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level outside try) for each import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Try)):
            guarded.update(id(child) for child in ast.walk(node) if child is not node)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out += [(name.split(".")[0], id(node) not in guarded) for name in names]
    return out


def test_torch_is_a_tested_range_not_one_build():
    """Issue 8.18: an exact pin forces every user's environment onto one torch build."""
    requirements = _requirements()
    for name, tested in (("torch", "2.13.0"), ("torchvision", "0.28.0")):
        spec = requirements[name].specifier
        assert not any(s.operator in ("==", "===") for s in spec), f"{name} is pinned exactly: {spec}"
        assert spec.contains(tested), f"{name} {spec} excludes the tested {tested}"
        assert any(s.operator in ("<", "<=") for s in spec), f"{name} has no upper bound: {spec}"


def test_every_module_the_library_imports_is_declared():
    """Read from the code: module-level imports need a dependency, lazy ones (optional features) at least an extra."""
    distributions = importlib.metadata.packages_distributions()
    core, declared = _requirements(), _requirements(extras=True)
    missing = []
    for path in _shipped_files():
        for module, eager in _imports(path):
            if module in FIRST_PARTY or module in sys.stdlib_module_names or module == "__future__":
                continue
            # Not installed here (an optional feature's package): the module is named as its distribution.
            names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
            if not names & set(core if eager else declared):
                kind = "a dependency" if eager else "a dependency or an extra"
                missing.append(f"{path.relative_to(ROOT)}: {module} ({'/'.join(sorted(names))}) is not {kind}")
    assert not missing, "\n".join(missing)


def test_the_installed_library_ships_no_test_or_example_scaffolding():
    """Issue 13.6: the tiny-model builders and anything importing tests stay out of the wheel."""
    offenders = []
    for path in _shipped_files():
        for module, _ in _imports(path):
            if module in ("tests", "examples", "bench"):
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
        if "def build_tiny_vlm" in path.read_text():
            offenders.append(f"{path.relative_to(ROOT)} defines the tiny-model builders")
    assert not offenders, "\n".join(offenders)
    assert not any(path.is_relative_to(ROOT / "tests") for path in _shipped_files())


def test_benchmarks_do_not_import_the_tests():
    for path in sorted((ROOT / "bench").glob("*.py")):
        modules = {module for module, _ in _imports(path)}
        assert "tests" not in modules, f"{path.relative_to(ROOT)} imports tests"
        assert "tests." not in path.read_text(), f"{path.relative_to(ROOT)} names a tests module"


@pytest.mark.subprocess
def test_make_tiny_models_runs_as_the_readme_says_from_any_folder(tmp_path):
    """`python examples/make_tiny_models.py .tiny-models`, with only the installed library importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The library as installed, not the checkout: only a copy of pipeline/ and schemas/ is importable.
    site = tmp_path / "site"
    for package in ("pipeline", "schemas"):
        shutil.copytree(ROOT / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    env["PYTHONPATH"] = str(site)
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_tiny_models.py"), ".tiny-models"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (work / ".tiny-models" / "vlm" / "config.json").is_file()
    assert (work / ".tiny-models" / "clip" / "open_clip_config.json").is_file()
