"""Shared fixtures live in tests/fixtures/, one module per area; the test layers are decided here.

Layers (markers registered in pyproject.toml):
  ray         starts or joins a local Ray: marked automatically when a test's
              fixtures include ray_local, ray_module or starts_ray
              (tests/fixtures/ray.py)
  subprocess  spawns a captioner, python, ray or browser process: marked
              explicitly (@pytest.mark.subprocess or a module's pytestmark)
  cluster     starts a multi-node Ray cluster (deselected by default)
The fast layer, ``python -m pytest -m "not ray and not subprocess"``, runs
neither: a test not marked ray that calls ray.init, or one marked neither
that spawns such a process, fails saying which marker it lacks, so the
layers stay honest. (Inside a ray test Ray spawns its own processes, so
there the process guard is off.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fixtures.ray import RAY_FIXTURES

pytest_plugins = [
    "tests.fixtures.hf_cache",
    "tests.fixtures.images",
    "tests.fixtures.models",
    "tests.fixtures.moondream_cache",
    "tests.fixtures.s3",
    "tests.fixtures.ray",
]

# Programs whose start makes a test a subprocess test.
_SPAWNED = {"python", "python3", os.path.basename(sys.executable), "captioner", "ray", "chromium", "chromedriver"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Model stages set torch's thread count for their actor; run in a test's process they must not leak it
    (Moondream's exact-id tests depend on it): whatever a test sets is put back."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    yield
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _layer_guard(request, monkeypatch):
    """Fail a test that starts Ray without the ray marker, or spawns a process without the subprocess marker."""
    node = request.node
    if node.get_closest_marker("cluster"):
        yield
        return
    if node.get_closest_marker("ray"):
        yield  # Ray starts its own processes (raylet, workers): no process guard here
        return
    if "ray" in sys.modules:
        import ray

        def refuse_ray(*args, **kwargs):
            raise AssertionError(f"{node.nodeid} starts Ray: request ray_local/ray_module (or starts_ray)")

        monkeypatch.setattr(ray, "init", refuse_ray)
    if not node.get_closest_marker("subprocess"):
        real_init = subprocess.Popen.__init__

        def guarded_init(self, args, *rest, **kwargs):
            argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
            program = os.path.basename(os.fsdecode(argv[0]).split()[0]) if argv else ""
            if program in _SPAWNED or program.startswith("python"):
                raise AssertionError(f"{node.nodeid} spawns {program}: mark it @pytest.mark.subprocess")
            real_init(self, args, *rest, **kwargs)

        monkeypatch.setattr(subprocess.Popen, "__init__", guarded_init)
    yield
