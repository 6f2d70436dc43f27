"""The lease: one writer at a time for an output or an index database.

``captioner run`` holds a lease on its output from before it lists the source
until its final merge is done; ``captioner index`` holds one on its --db for
the whole build. Readers (search, serve, export, index reading an output)
never take one.

The lease is a small JSON lock file (:func:`lease_name`): in a folder output,
``DIR/.captioner.lease``; beside a single file ``NAME``, ``.NAME.lease``. It
names its owner (command, user, host, pid, the process's start time) and
carries a heartbeat the owner refreshes every ``HEARTBEAT_S`` seconds.

- acquire: an exclusive create (pipeline.storage.Folder.create_exclusive). If a
  lease is there, its owner is judged: on this host it is stale at once when
  its pid is gone or belongs to a process started at another time (pid
  reuse); from another host when its heartbeat is older than
  ``STALE_AFTER_S``. A live owner means :class:`LeaseHeld` (one line naming
  the owner), or, with ``wait_s``, a wait for it to go.
- takeover of a stale lease: a conditional replace, so two takers cannot both
  win: locally under an flock on the folder, on S3 a PUT with ``If-Match`` the
  stale lease's ETag. Other stores compare and replace: best effort.
- release: the file is deleted only while it is still ours (same content).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

from pipeline.exit_codes import BUSY
from pipeline.storage import Folder, OutputError, protocol_of

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
# A lease from another host whose heartbeat is older than this is stale (clocks may differ by a little).
STALE_AFTER_S = 120.0
FOLDER_LEASE = ".captioner.lease"


def lease_name(file_name: str | None = None) -> str:
    """The lock file's name: inside a folder output ``.captioner.lease``; beside a file NAME ``.NAME.lease``."""
    return f".{file_name}.lease" if file_name else FOLDER_LEASE


@dataclass(frozen=True)
class Owner:
    command: str
    user: str
    host: str
    pid: int
    process_started: str | None
    created: float
    heartbeat: float
    token: str

    @classmethod
    def me(cls, command: str) -> "Owner":
        now = time.time()
        return cls(command, _user(), socket.gethostname(), os.getpid(), process_start(os.getpid()), now, now,
                   uuid.uuid4().hex)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def decode(cls, data: bytes) -> "Owner | None":
        try:
            fields = json.loads(data)
            return cls(**{k: fields[k] for k in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        since = datetime.fromtimestamp(self.created, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return (f"{self.command}, pid {self.pid} on host {self.host} (user {self.user}), since {since} "
                f"(heartbeat {max(0, now - self.heartbeat):.0f} s ago)")


class LeaseHeld(OutputError):
    """Another live process holds the lease; the message names it and what to do."""

    def __init__(self, message: str, owner: Owner | None):
        super().__init__(message)
        self.owner = owner


class LeaseLost(OutputError):
    """Our lease was taken over (it looked stale to another process); the work must not be published."""


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, as a token that differs for a reused pid (Linux: boot id + start ticks)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            ticks = stat.read().rsplit(b")", 1)[1].split()[19].decode()
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return f"{boot.read().strip()}:{ticks}"
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def is_stale(owner: Owner | None, *, age_s: float, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether a lease can be taken over. ``age_s``: how long ago the lock file was last written."""
    if owner is None:  # unreadable (a writer killed mid-create by an older version, or garbage)
        return age_s > stale_after_s
    if owner.host == socket.gethostname():
        if not pid_alive(owner.pid):
            return True
        started = process_start(owner.pid)
        return bool(owner.process_started and started and started != owner.process_started)
    return time.time() - owner.heartbeat > stale_after_s


class Lease:
    """The lease on ``name`` in ``folder``, for ``command``; ``what`` is how the guarded thing is shown."""

    def __init__(self, folder: Folder, name: str, *, what: str, command: str,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.folder = folder
        self.name = name
        self.what = what
        self.command = command
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.owner: Owner | None = None
        self._mine: bytes | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._io = threading.Lock()
        self.lost = False

    @property
    def path(self) -> str:
        return self.folder.display(self.name)

    # ---- acquire ---------------------------------------------------------
    def acquire(self, wait_s: float = 0.0) -> "Lease":
        deadline = time.monotonic() + wait_s
        while True:
            held = self._try_acquire()
            if held is None:
                self._start_heartbeat()
                return self
            if time.monotonic() >= deadline:
                raise held
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))

    def _try_acquire(self) -> LeaseHeld | None:
        """None when the lease is ours now; otherwise why not."""
        owner = Owner.me(self.command)
        data = owner.encode()
        for _ in range(5):
            if self.folder.create_exclusive(self.name, data):
                self.owner, self._mine = owner, data
                return None
            current = self._read()
            if current is None:  # released between our create and read: try again
                continue
            existing, marker, age_s = current
            theirs = Owner.decode(existing)
            if not is_stale(theirs, age_s=age_s, stale_after_s=self.stale_after_s):
                return self._held(theirs)
            if self._replace_if_unchanged(existing, marker, data):
                log.warning("took over the stale lease %s of %s", self.path,
                            theirs.describe() if theirs else "an unreadable owner")
                self.owner, self._mine = owner, data
                return None
        return self._held(Owner.decode(current[0]) if current else None)

    def _held(self, owner: Owner | None) -> LeaseHeld:
        who = owner.describe() if owner else "another process (its lease file is unreadable)"
        host = owner.host if owner else "its host"
        return LeaseHeld(
            f"{self.what} is being written by {who}; wait for it to finish, or stop it, then run again "
            f"(lease {self.path}; a lease whose process died is taken over at once by a command on {host}, "
            f"and by one on another host after {self.stale_after_s:.0f} s without a heartbeat)",
            owner,
        )

    # ---- heartbeat and release ----------------------------------------------
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat {self.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.heartbeat()
            except Exception as exc:  # noqa: BLE001 - a store that does not answer now may answer at the next beat
                log.warning("could not refresh the lease %s: %s", self.path, exc)
            if self.lost:
                return

    def heartbeat(self) -> None:
        """Refresh the heartbeat, if the lease is still ours (else mark it lost)."""
        with self._io:
            if self._mine is None or self.lost:
                return
            fresh = replace(self.owner, heartbeat=time.time())
            data = fresh.encode()
            current = self._read()
            if current is None or current[0] != self._mine or not self._replace_if_unchanged(current[0], current[1], data):
                self.lost = True
                log.error("the lease %s is no longer ours: another process took it over", self.path)
                return
            self.owner, self._mine = fresh, data

    def check(self) -> None:
        """Raise :class:`LeaseLost` when another process took the lease over."""
        if self.lost:
            raise LeaseLost(
                f"{self.what}: another process took over this command's lease {self.path} (it judged it stale); "
                f"stopped before publishing; check who writes {self.what} and run again"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._io:
            mine, self._mine = self._mine, None
            if mine is None or self.lost:
                return
            try:
                current = self._read()
                if current is not None and current[0] == mine:
                    self._delete_if_unchanged(current[0], current[1])
            except Exception as exc:  # noqa: BLE001 - the store failed: that error, not this one, is the news
                # Releasing runs in a finally: raising here would hide why the command
                # stopped. A lease left behind names a process that is gone, so the
                # next run takes it over as stale.
                log.warning("could not remove the lease %s (%s); the next run takes it over", self.what, type(exc).__name__)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- conditional I/O ------------------------------------------------------
    def _read(self) -> tuple[bytes, object, float] | None:
        """(content, change marker, seconds since written) of the lease file, None if there is none."""
        try:
            if self.folder.local:
                full = self.folder.full(self.name)
                with open(full, "rb") as handle:
                    data = handle.read()
                    stat = os.fstat(handle.fileno())
                return data, (stat.st_ino, stat.st_mtime_ns), time.time() - stat.st_mtime
            before = self.folder.info(self.name)
            data = self.folder.fs.cat_file(self.folder.full(self.name))
            after = self.folder.info(self.name)
        except FileNotFoundError:
            return None
        marker = _etag(before)
        if marker != _etag(after):
            marker = None  # changed while read: no conditional write can be based on it
        from pipeline.storage import modified_time

        written = modified_time(after)
        return data, marker, (time.time() - written) if written is not None else 0.0

    def _replace_if_unchanged(self, expected: bytes, marker, data: bytes) -> bool:
        if self.folder.local:
            with self._folder_lock():
                current = self._read()
                if current is None or current[0] != expected:
                    return False
                self.folder.write(self.name, data)
                return True
        if marker is None:
            return False
        if _is_s3(self.folder):
            try:
                self.folder.fs.pipe_file(self.folder.full(self.name), data, IfMatch=marker)
                return True
            except OSError as exc:
                if _lost_race(exc):
                    return False
                raise
        # Best effort: compare, then write (a store without conditional writes).
        current = self._read()
        if current is None or current[0] != expected:
            return False
        self.folder.fs.pipe_file(self.folder.full(self.name), data)
        return self.folder.read_bytes(self.name) == data

    def _delete_if_unchanged(self, expected: bytes, marker) -> None:
        if self.folder.local:
            with self._folder_lock():
                current = self._read()
                if current is not None and current[0] == expected:
                    self.folder.delete(self.name)
            return
        if _is_s3(self.folder) and marker is not None:
            bucket, key, _ = self.folder.fs.split_path(self.folder.full(self.name))
            try:
                self.folder.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=marker)
                return
            except OSError as exc:
                if _lost_race(exc):
                    return
                if "not implemented" not in str(exc).lower():
                    raise
        with contextlib.suppress(FileNotFoundError):
            self.folder.delete(self.name)

    @contextlib.contextmanager
    def _folder_lock(self):
        """An flock on the lease's folder: local replaces and deletes of the lease happen one at a time."""
        import fcntl

        fd = os.open(self.folder.full(), os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):  # a filesystem without flock: best effort
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock


def _etag(info: dict):
    return info.get("ETag") or info.get("etag") or info.get("generation") or info.get("mtime")


def _is_s3(folder: Folder) -> bool:
    return not folder.local and protocol_of(folder.uri) in ("s3", "s3a")


def _lost_race(exc: BaseException) -> bool:
    text = str(exc).lower().replace("-", "")
    return isinstance(exc, FileExistsError) or "precondition" in text or "conflict" in text


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def lease_for_file(uri: str, storage_options: dict | None = None, *, what: str | None = None, command: str) -> Lease:
    """The lease on the file ``uri`` (a single-file output, an index database): ``.NAME.lease`` beside it."""
    from pipeline.storage import display, name_of, parent_of

    name = name_of(uri)
    folder = Folder(parent_of(uri), storage_options, role="output")
    folder.makedirs()
    return Lease(folder, lease_name(name), what=what or display(uri), command=command)


def lease_for_folder(uri: str, storage_options: dict | None = None, *, what: str | None = None, command: str) -> Lease:
    """The lease on the folder output ``uri``: ``.captioner.lease`` inside it."""
    folder = Folder(uri, storage_options, role="output")
    folder.makedirs()
    return Lease(folder, lease_name(), what=what or folder.display(), command=command)


def as_click_error(exc: LeaseHeld):
    """The one-line CLI error for a refused command, exiting with exit_codes.BUSY (nothing done; try later)."""
    import click

    error = click.ClickException(str(exc))
    error.exit_code = BUSY
    return error
