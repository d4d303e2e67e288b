"""One run per phase directory: a lock file per process, with a heartbeat and stale-lock recovery.

``WORKDIR/<phase>/lock/process_<i>.json`` is created with ``O_CREAT | O_EXCL`` (atomic on local file systems and
NFS) by process ``i`` of a run and holds its host name, pid, a random token and a heartbeat time that a daemon
thread refreshes every ``HEARTBEAT_S`` seconds. Every process of a second run on the same phase directory finds
its counterpart's lock and stops with ``WorkdirLockedError`` naming the holder, so two runs never interleave
checkpoints or metrics (processes of ONE multi-host run use different files).

A lock is stale (taken over, with a message) when its process is gone: on the same host, its pid no longer
exists; on any host, its heartbeat is older than ``STALE_S``. A killed run therefore never blocks its own rerun.
A takeover renames the stale file away before creating a fresh one; the heartbeat re-reads the file and flags a
lost lock (another run took it), which the loop checks every step.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from typing import Optional

from bifrost_jax.train.guard import EXIT_WORKDIR_LOCKED, TrainingStopped

HEARTBEAT_S = 30.0
STALE_S = 300.0


class WorkdirLockedError(TrainingStopped):
    exit_code = EXIT_WORKDIR_LOCKED


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or garbage: judged by its age below


class WorkdirLock:
    def __init__(self, run_dir: str, process_index: int = 0, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S):
        self.dir = os.path.join(run_dir, "lock")
        self.path = os.path.join(self.dir, f"process_{process_index}.json")
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = uuid.uuid4().hex
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "heartbeat": time.time()}

    def _stale_reason(self, held: dict) -> Optional[str]:
        """Why ``held`` is stale, or None while its holder is alive."""
        age = time.time() - float(held.get("heartbeat", 0.0))  # a garbled file counts as very old
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) \
                and not _pid_alive(held["pid"]):
            return f"process {held['pid']} on this host is gone"
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s"
        return None

    def acquire(self, report=print) -> "WorkdirLock":
        os.makedirs(self.dir, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = _read(self.path)
                if held is None:
                    continue  # released meanwhile
                reason = self._stale_reason(held)
                if reason is None:
                    raise WorkdirLockedError(
                        f"another run holds {self.path} (host {held.get('host')}, pid {held.get('pid')}, heartbeat "
                        f"{time.time() - float(held.get('heartbeat', 0)):.0f} s ago): two runs must not share a "
                        f"phase directory. Wait for it, stop it, or use another --workdir.") from None
                aside = f"{self.path}.stale-{self.token}"
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue  # another run took it over first; try again
                report(f"taking over the stale lock {self.path} (host {held.get('host')}, pid {held.get('pid')}: "
                       f"{reason})")
                os.remove(aside)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self._record(), fh)
            self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise WorkdirLockedError(f"could not take {self.path}: other runs keep taking it")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s) and self._beat_once():
            pass

    def _beat_once(self) -> bool:
        """Refresh the heartbeat; False (and ``lost`` set) if the file is no longer this run's."""
        held = _read(self.path)
        if not held or held.get("token") != self.token:
            self.lost = f"the lock {self.path} was taken over by another run ({held})"
            return False
        tmp = f"{self.path}.{self.token}.tmp"
        with open(tmp, "w") as fh:
            json.dump(self._record(), fh)
        os.replace(tmp, self.path)
        return True

    def check(self) -> None:
        """Raise if another run took the lock (called every step: a flag read)."""
        if self.lost:
            raise WorkdirLockedError(self.lost + "; stopping so that two runs do not interleave checkpoints")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        held = _read(self.path)
        if held and held.get("token") == self.token:
            try:
                os.remove(self.path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
