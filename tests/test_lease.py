"""pipeline.lease: exclusive create, refusal naming the owner, stale takeover, heartbeat, release only ours.

Locally and on a bucket (moto's S3 server on loopback, over HTTP through
s3fs, with its conditional PUT: If-None-Match / If-Match).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace

import pytest

from pipeline.lease import Lease, LeaseHeld, LeaseLost, Owner, lease_name
from pipeline.storage import Folder


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path) -> Folder:
    if request.param == "local":
        return Folder(str(tmp_path / "out"))
    bucket = request.getfixturevalue("s3_bucket")
    return Folder(bucket.url("out"), bucket.storage_options)


def _lease(folder: Folder, **kw) -> Lease:
    kw.setdefault("heartbeat_s", 3600)
    return Lease(folder, lease_name(), what=folder.display(), command="captioner run", **kw)


def _written(folder: Folder) -> Owner:
    return Owner.decode(folder.read_bytes(lease_name()))


def test_a_second_taker_is_refused_naming_the_owner_and_the_released_lease_is_gone(folder):
    first = _lease(folder).acquire()
    with pytest.raises(LeaseHeld) as held:
        _lease(folder).acquire()
    message = str(held.value)
    assert f"is being written by captioner run, pid {os.getpid()} on host" in message
    assert "wait for it to finish, or stop it" in message and "\n" not in message
    assert held.value.owner.token == first.owner.token
    first.release()
    assert not folder.exists(lease_name())
    _lease(folder).acquire().release()


def test_a_lease_of_a_dead_process_is_taken_over(folder):
    dead = replace(Owner.me("captioner run"), pid=_dead_pid(), process_started=None)
    folder.makedirs()
    assert folder.create_exclusive(lease_name(), dead.encode())
    lease = _lease(folder).acquire()
    assert _written(folder).token == lease.owner.token != dead.token
    lease.release()


def test_a_reused_pid_counts_as_dead_and_another_host_by_its_heartbeat(folder):
    folder.makedirs()
    reused = replace(Owner.me("captioner run"), process_started="another-boot:1")
    assert folder.create_exclusive(lease_name(), reused.encode())
    _lease(folder).acquire().release()

    elsewhere = replace(Owner.me("captioner index"), host="other-host", heartbeat=time.time() - 5)
    assert folder.create_exclusive(lease_name(), elsewhere.encode())
    with pytest.raises(LeaseHeld, match="captioner index, pid .* on host other-host"):
        _lease(folder, stale_after_s=60).acquire()
    _lease(folder, stale_after_s=1).acquire().release()  # its heartbeat is older than that


def test_the_heartbeat_refreshes_and_a_lease_taken_over_is_lost_and_not_deleted(folder):
    lease = _lease(folder, heartbeat_s=0.1).acquire()
    created = lease.owner.heartbeat
    deadline = time.monotonic() + 20
    while _written(folder).heartbeat == created:
        assert time.monotonic() < deadline, "the heartbeat never refreshed the lease"
        time.sleep(0.05)
    lease._stop.set()
    lease._thread.join()

    # Another process judged it stale and took it over: ours is lost, theirs stays.
    theirs = replace(Owner.me("captioner run"), token="theirs").encode()
    folder.write(lease_name(), theirs)
    lease.heartbeat()
    with pytest.raises(LeaseLost, match="took over"):
        lease.check()
    lease.release()
    assert folder.read_bytes(lease_name()) == theirs


def test_release_deletes_only_our_lease(folder):
    lease = _lease(folder).acquire()
    theirs = replace(Owner.me("captioner run"), token="theirs").encode()
    folder.write(lease_name(), theirs)
    lease.release()
    assert folder.read_bytes(lease_name()) == theirs


@pytest.mark.parametrize("stale_first", [False, True], ids=["free", "stale"])
def test_racing_takers_exactly_one_wins(folder, stale_first):
    folder.makedirs()
    if stale_first:
        dead = replace(Owner.me("captioner run"), pid=_dead_pid(), process_started=None)
        assert folder.create_exclusive(lease_name(), dead.encode())
    takers = [_lease(folder) for _ in range(6)]
    start = threading.Barrier(len(takers))
    won, refused = [], []

    def take(lease):
        start.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeld:
            refused.append(lease)

    threads = [threading.Thread(target=take, args=(t,)) for t in takers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == 5
    assert _written(folder).token == won[0].owner.token
    won[0].release()


def test_wait_takes_the_lease_once_the_owner_releases_it(tmp_path):
    folder = Folder(str(tmp_path))
    first = _lease(folder).acquire()
    threading.Timer(0.5, first.release).start()
    second = _lease(folder).acquire(wait_s=20)
    assert json.loads(folder.read_bytes(lease_name()))["token"] == second.owner.token
    second.release()


def test_create_exclusive_never_replaces(folder):
    folder.makedirs()
    assert folder.create_exclusive("a.json", b"one")
    assert not folder.create_exclusive("a.json", b"two")
    assert folder.read_bytes("a.json") == b"one"
    assert folder.list(include_hidden=True) == ["a.json"]  # no temporary left beside it


# ---- at the CLI, on a bucket (moto's server) ----------------------------------------------


def test_a_run_into_a_bucket_output_another_host_writes_is_refused_and_a_stale_one_taken_over(s3_bucket, tmp_path, tiny_clip_dir):
    from pipeline.exit_codes import BUSY
    from tests.cli import run_cli
    from tests.fixtures.faults import assert_one_line_error

    empty = tmp_path / "photos"  # no images: the run needs no Ray, only the output and its lease
    empty.mkdir()
    out = Folder(s3_bucket.url("out"), s3_bucket.storage_options)
    args = [empty, "--out", s3_bucket.url("out/"), *s3_bucket.cli_options, "--no-caption", "--no-probes",
            "--embed-model", tiny_clip_dir]
    elsewhere = replace(Owner.me("captioner run"), host="gpu-box-7", pid=4242, heartbeat=time.time() - 30)
    assert out.create_exclusive(lease_name(), elsewhere.encode())

    refused = run_cli(*args, expect_exit=BUSY)
    assert_one_line_error(refused.output, "is being written by captioner run, pid 4242 on host gpu-box-7",
                          "(heartbeat 3", "wait for it to finish")
    assert s3_bucket.keys("out/") == ["out/.captioner.lease"]  # nothing written, the lease left alone

    # The other host's run died an hour ago: its lease is stale and taken over.
    out.write(lease_name(), replace(elsewhere, heartbeat=time.time() - 3600).encode())
    done = run_cli(*args)
    assert "no images found" in done.output
    assert ".captioner.lease" not in " ".join(s3_bucket.keys("out/"))
    assert [k for k in s3_bucket.keys("out/") if k.endswith(".parquet")]
