"""Batches of items loaded on a thread pool, ahead of use and in order.

An image folder's batches are decoded file by file. Done serially on the
calling thread, decoding waits for the model and the model for decoding, and
only one core decodes. `Prefetcher` loads the items of the next few batches
on a pool of threads (PIL releases the GIL while it decodes and resizes), so
all cores decode while the model runs on the current batch. Batches come
back in index order whatever order the threads finish in, so a pass over the
data sees the same samples in the same order as a serial one.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers() -> int:
    """Decode threads when none are asked for: one per core, plus one.

    A decoding thread holds the interpreter lock between PIL's calls (opening
    a file, starting a resize), and the model's thread holds it between the
    backend's; with one thread per core, a core idles whenever its thread
    waits for the lock. The extra thread keeps every core decoding
    (`benchmarks/`, case 8, compares it with one thread per core).
    """
    return available_cores() + 1


class Prefetcher:
    """`load` applied to the items of batch i, with batches after i in flight.

    Args:
        load: loads one item (e.g. decodes one file); runs on the pool.
        items: `items(i)` lists batch i's items.
        batches: how many batches there are.
        workers: threads; 1 loads on the calling thread, with no pool.
        ahead: batches loaded ahead of the one asked for.

    Reading batches in order (0, 1, 2, ...) keeps `ahead` batches in flight;
    asking for any other batch drops what was in flight and starts again
    from it.
    """

    def __init__(
        self,
        load: Callable,
        items: Callable[[int], Sequence],
        batches: int,
        workers: int,
        ahead: int = 2,
    ):
        self._load, self._items, self._batches = load, items, batches
        self.workers, self.ahead = workers, ahead
        self._pool: ThreadPoolExecutor | None = None
        self._pending: collections.deque[list[Future]] = collections.deque()
        self._next = 0  # the batch _pending starts at
        self._lock = threading.Lock()

    def get(self, i: int) -> list:
        """The loaded items of batch `i`, in order."""
        if self.workers <= 1:
            return [self._load(item) for item in self._items(i)]
        with self._lock:
            if i != self._next or not self._pending:
                self._drop()
                self._next = i
                self._submit(i)
            futures = self._pending.popleft()
            self._next = i + 1
            self._submit(i + 1)
        return [f.result() for f in futures]

    def close(self) -> None:
        """Drop the batches in flight (the pool stays, for the next pass)."""
        with self._lock:
            self._drop()

    def _submit(self, start: int) -> None:
        """Keep batches start .. start + ahead in flight."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, "surgery-load")
        first = start + len(self._pending)
        for j in range(first, min(start + self.ahead + 1, self._batches)):
            self._pending.append(
                [self._pool.submit(self._load, item) for item in self._items(j)]
            )

    def _drop(self) -> None:
        while self._pending:
            for future in self._pending.popleft():
                future.cancel()

    def __getstate__(self):  # a pool does not pickle (multiprocessing workers)
        state = dict(self.__dict__)
        state.update(_pool=None, _pending=collections.deque(), _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())
