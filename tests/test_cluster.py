"""`captioner run --address` against a real Ray cluster on this machine: a 2-CPU head, then two nodes.

The head and the second node are started with `ray start --block`, so that
terminating those two processes tears down exactly this cluster's services
(a global `ray stop` would also kill any other Ray running here). One head
serves the module: the README's recipe runs on it alone, and a second node
joins it for the two-node run and leaves after it (a head of its own for
each test cost another start and stop, about 40 s).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pyarrow.parquet as pq
import pytest

from schemas import STATUS_OK, check_schema
from tests.fixtures.images import make_jpegs

pytestmark = [pytest.mark.cluster, pytest.mark.subprocess]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray(*args: str, env: dict) -> subprocess.Popen:
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.Popen(
        [ray_cli, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_for_nodes(address: str, count: int, env: dict, timeout_s: int = 90) -> None:
    """Until exactly ``count`` nodes are alive (a node joined, or one that left is seen gone)."""
    # One client process polls, instead of paying Ray's import for every look.
    probe = (
        "import ray, time; ray.init(address=%r, logging_level='ERROR')\n"
        "deadline = time.monotonic() + %d\n"
        "while sum(n['Alive'] for n in ray.nodes()) != %d:\n"
        "    assert time.monotonic() < deadline, 'the nodes alive did not become the count wanted'\n"
        "    time.sleep(0.5)\n"
    ) % (address, timeout_s, count)
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=timeout_s + 30)
    assert done.returncode == 0, done.stderr[-2000:]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            # `ray start --block` stops its services on SIGTERM; past this, kill the whole group.
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@dataclass(frozen=True)
class Head:
    address: str  # the GCS, for `--address` and `ray start --address`
    dashboard: str  # the job server, for `ray job submit --address`
    env: dict  # HOME holds the token the head was started with


@pytest.fixture(scope="module")
def default_two_cpu_head(tmp_path_factory):
    """A head started the way the README says, on a machine where Ray already made a token.

    Any earlier embedded Ray (a plain `captioner run`) leaves ~/.ray/auth_token
    behind, and with it `ray start --head` turns token authentication on. HOME
    is a fresh folder so the test neither reads nor writes the real one.
    """
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray_cli, "get-auth-token", "--generate"], env=env, capture_output=True, check=True, timeout=60)
    port, dashboard_port = _free_port(), _free_port()
    # Its own agent ports: the second node that joins it on this machine (two_node_cluster) takes the defaults.
    agent_ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                   f"--metrics-export-port={_free_port()}"]  # fmt: skip
    head = _ray("--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                *agent_ports, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _port_open(dashboard_port):
            assert head.poll() is None, head.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "head node did not come up"
            time.sleep(0.5)
        yield Head(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", env)
    finally:
        _stop(head)


def test_readme_job_submit_recipe_on_a_default_two_cpu_head(default_two_cpu_head, tmp_path, tiny_vlm_dir, tiny_clip_dir):
    """Issue 8.16: token auth on by default, and a plan (caption + embed actors) that must fit 2 CPUs."""
    dashboard, env = default_two_cpu_head.dashboard, default_two_cpu_head.env
    photos = tmp_path / "photos"
    make_jpegs(photos, 4)
    out = tmp_path / "captions.parquet"
    config = tmp_path / "captions.config.json"
    config.write_text(json.dumps({
        "source": str(photos), "output": str(out),
        "caption": {"model": str(tiny_vlm_dir), "probes": ["Is it day?"]}, "embed": {"model": str(tiny_clip_dir)},
    }))  # fmt: skip
    # The README's command, word for word but for the address and the path.
    command = f"RAY_AUTH_MODE=token ray job submit --address {dashboard} -- python -m jobs.caption_job --config {config}"
    bin_dir = os.path.dirname(sys.executable)
    shell_env = dict(env, PATH=f"{bin_dir}:{env.get('PATH', '')}")
    for _ in range(12):
        done = subprocess.run(command, shell=True, env=shell_env, capture_output=True, text=True, timeout=300,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fmt: skip
        if "No available agent" not in done.stderr:
            break
        time.sleep(5)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 4 and all(r["status"] == STATUS_OK and r["caption"] and r["embedding"] for r in rows)


@pytest.fixture
def two_node_cluster(default_two_cpu_head):
    """The module's head and a second 2-CPU node, which leaves after the test: the head is alone again
    for any test after it (the README recipe's plan must fit the head's 2 CPUs, not 4)."""
    head = default_two_cpu_head
    # The clients name the head's auth mode; the token is the one in the head's HOME.
    env = dict(head.env, RAY_AUTH_MODE="token")
    node = _ray(f"--address={head.address}", env=env)
    try:
        _wait_for_nodes(head.address, 2, env)
        yield head.address, env
    finally:
        _stop(node)
        _wait_for_nodes(head.address, 1, env)


def test_run_on_a_two_node_cluster(two_node_cluster, tmp_path, tiny_vlm_dir, tiny_clip_dir):
    address, env = two_node_cluster
    photos = tmp_path / "photos"
    make_jpegs(photos, 12)
    out = tmp_path / "captions.parquet"
    # The caption and embed actors (1.5 CPUs each) cannot share one 2-CPU
    # node, so the run only finishes if Ray places work on both nodes.
    config = tmp_path / "run.yaml"
    config.write_text("ray:\n  model_actor_cpus: 1.5\n")
    captioner = os.path.join(os.path.dirname(sys.executable), "captioner")
    done = subprocess.run(
        [captioner, "run", str(photos), "--out", str(out), "--address", address, "--config", str(config),
         "--caption-model", str(tiny_vlm_dir), "--embed-model", str(tiny_clip_dir), "--no-progress", "--batch-size", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = pq.read_table(out)
    check_schema(table.schema)
    rows = table.to_pylist()
    assert len(rows) == 12 and all(r["status"] == STATUS_OK for r in rows)
    assert all(r["caption"] and r["embedding"] for r in rows)
    assert "ok          12" in done.stdout
