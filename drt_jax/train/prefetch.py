"""Batches on the device ahead of the step: a background thread reads the host iterator (grain) and
puts each batch onto the mesh while the device runs the previous steps.

Each item carries the data iterator's position after its batch, so a checkpoint saved after step s
records the position of the batch that step s consumed, not that of the batches read ahead.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from typing import Any


class IteratorPosition:
    """A saved data-iterator state in the form grain's orbax handler writes (get_state() -> bytes)."""

    def __init__(self, state: Any):
        self._state = state

    def get_state(self) -> bytes:
        return self._state if isinstance(self._state, bytes) else json.dumps(self._state, indent=4).encode()


_DONE = object()


class DevicePrefetcher:
    """Iterates (local numpy batch or None, device batch, IteratorPosition), `depth` batches ahead.

    host_iter: yields dicts of numpy arrays (and has get_state()); prepare(batch) -> the fields the step
    takes; to_device(fields) -> the global device arrays. keep_local: also return the numpy fields (for
    a batch hook). An exception in the thread is raised by the next `next()`.
    """

    def __init__(self, host_iter, prepare: Callable, to_device: Callable, *, depth: int = 2, keep_local: bool = False):
        self._iter, self._prepare, self._to_device, self._keep = host_iter, prepare, to_device, keep_local
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drt-prefetch", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                fields = self._prepare(next(self._iter))
                self._put((fields if self._keep else None, self._to_device(fields), IteratorPosition(self._iter.get_state())))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put(err)
            return
        self._put(_DONE)

    def _put(self, item) -> None:
        """Waits for room in the queue, giving up when closed (the consumer may never read again)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is _DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
