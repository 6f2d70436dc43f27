"""The resource plan fits the cluster it is given (no Ray needed: cluster resources are data)."""

from __future__ import annotations

import pytest

from jobs.ray_plan import RayUnavailable, plan_resources
from pipeline.config import RunConfig


def config(**ray):
    return RunConfig.from_dict({"source": "/p", "output": "/o.parquet", "ray": ray})


def test_defaults_shrink_to_fit_a_two_cpu_head():
    plan = plan_resources(config(), {"CPU": 2.0}, use_gpu=False)
    total = 2 * plan.model_actor_cpus + plan.decode_cpus + plan.conform_cpus
    assert total == pytest.approx(2.0) and plan.torch_threads == 1


def test_defaults_are_kept_where_they_fit():
    plan = plan_resources(config(), {"CPU": 16.0}, use_gpu=False)
    assert (plan.model_actor_cpus, plan.decode_cpus, plan.conform_cpus) == (1.0, 0.5, 0.25)


def test_explicit_shares_are_kept_and_a_misfit_is_refused_with_the_fix():
    with pytest.raises(RayUnavailable, match=r"needs 128.75 CPUs \(the cluster has 4\).*model_actor_cpus"):
        plan_resources(config(model_actor_cpus=64), {"CPU": 4.0}, use_gpu=False)
    plan = plan_resources(config(model_actor_cpus=1.5), {"CPU": 4.0}, use_gpu=False)
    assert plan.model_actor_cpus == 1.5 and plan.torch_threads == 2


def test_gpus_are_counted():
    with pytest.raises(RayUnavailable, match="1 GPUs"):
        plan_resources(config(), {"CPU": 8.0, "GPU": 0.5}, use_gpu=True)
    plan = plan_resources(config(), {"CPU": 8.0, "GPU": 1.0}, use_gpu=True)
    assert plan.use_gpu and plan.caption_gpus == 0.5
