"""jobs/ray_plan.py's ray_session: what an embedded Ray is started with, and that a joined cluster's own
settings are left alone."""

from __future__ import annotations

from jobs import ray_plan
from pipeline.config import RunConfig


def _config(**ray) -> RunConfig:
    return RunConfig.from_dict({"source": "/p", "output": "/o.parquet", "ray": ray})


def test_an_embedded_ray_keeps_its_idle_workers_for_the_runs_next_task(ray_stopped):
    """Ray kills a worker idle for 1 s once a node has more workers than CPUs, which a small machine
    always has during a run (each model actor is a worker): the decode worker went while the models
    ran, and the conform task then waited for a new worker to start."""
    import ray
    from ray._private import state

    with ray_plan.ray_session(_config()) as session:
        assert session.started
        threshold_ms = state.state.get_system_config().get("idle_worker_killing_time_threshold_ms")
    assert threshold_ms is not None and threshold_ms >= 30_000
    assert not ray.is_initialized()


def test_a_joined_cluster_is_started_with_none_of_the_embedded_settings(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray_plan, "_check_reachable", lambda address: None)

    with ray_plan.ray_session(_config(address="10.0.0.1:6379")):
        pass

    assert len(calls) == 1 and calls[0]["address"] == "10.0.0.1:6379"
    assert "_system_config" not in calls[0]  # ray.init refuses it when joining; the cluster has its own

