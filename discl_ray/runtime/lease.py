"""A writer's lease on a stage directory: one run writes a stage at a time, on any storage.

``_lease.json`` in the stage directory names its owner (host, pid, a run id) and a heartbeat time that a
background thread refreshes every ``HEARTBEAT_S``. Another run that finds a lease stops with a clear error,
unless the lease is stale: its heartbeat is older than ``TTL_S``, or its owner was a process on this host
that no longer exists (a ``kill -9``). Object stores offer no atomic create through ``pyarrow.fs``, so two
runs starting in the same second could both win; the re-read after writing narrows that window to the
store's read-after-write latency (strong on S3 and GCS). On start, stale temp files of killed writers are removed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Optional

from discl_ray.errors import UserError
from discl_ray.runtime.storage import Storage, as_storage

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
TTL_S = 60.0
LEASE = "_lease.json"


class StageBusy(UserError, RuntimeError):
    """Another live run holds the lease of this stage directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StageLease:
    """Context manager: hold ``<directory>/_lease.json`` while writing the stage."""

    def __init__(self, directory: "str | Storage", stage: str):
        self.dir = as_storage(directory)
        self.file = self.dir.join(LEASE)
        self.stage = stage
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "run": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _write(self) -> None:
        self.file.write_text(json.dumps({**self.owner, "stage": self.stage, "heartbeat": time.time()}))

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(self.file.read_text())
        except (FileNotFoundError, OSError, ValueError):
            return None

    def _stale(self, lease: dict) -> bool:
        if time.time() - float(lease.get("heartbeat", 0)) > TTL_S:
            return True
        return lease.get("host") == self.owner["host"] and not _alive(int(lease.get("pid", -1)))

    def acquire(self) -> "StageLease":
        held = self._read()
        if held and held.get("run") != self.owner["run"] and not self._stale(held):
            age = time.time() - float(held.get("heartbeat", 0))
            raise StageBusy(f"{self.dir} is being written by another `discl {self.stage}` (host {held.get('host')}, "
                            f"pid {held.get('pid')}, heartbeat {age:.0f} s ago); wait for it to finish, or remove "
                            f"{self.file} if that run is dead (a lease goes stale after {TTL_S:.0f} s)")
        if held:
            log.warning("taking over a stale lease on %s (owner %s pid %s)", self.dir, held.get("host"), held.get("pid"))
        self._write()
        again = self._read()
        if again and again.get("run") != self.owner["run"]:
            raise StageBusy(f"{self.dir}: another `discl {self.stage}` took the lease at the same moment")
        self.clean_temp()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.stage}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except OSError as err:  # a transient store error must not kill the run; the next beat retries
                log.warning("lease heartbeat failed: %s", err)

    def clean_temp(self) -> None:
        """Remove temp files a killed writer left (local storage; object-store PUTs leave none)."""
        if not self.dir.is_local or not self.dir.exists():
            return
        for root, _dirs, files in os.walk(self.dir.path):
            for name in files:
                if name.endswith(".tmp"):
                    os.unlink(os.path.join(root, name))

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        held = self._read()
        if held and held.get("run") == self.owner["run"]:
            self.file.delete()

    def __enter__(self) -> "StageLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
