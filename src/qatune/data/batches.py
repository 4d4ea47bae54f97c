"""The batches of a training run: which windows go into each micro-batch, and collating them ahead of the loop.

The order is a pure function of (seed, step), so a resumed run continues with exactly the batches an uninterrupted
one would have trained, and the FLOP count of a run can be computed from the plan without training it.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable

import numpy as np


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[np.ndarray]:
    """The batches of one epoch, a pure function of (seed, epoch): shuffled, and when grouping by length,
    sorted within chunks of 50 batches so each batch needs little padding, then the batches shuffled."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        mega = batch_size * 50
        order = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                                for chunk in np.array_split(order, max(1, math.ceil(len(order) / mega)))])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class BatchPlan:
    """Which windows each data-parallel rank trains in micro-batch ``m``: a pure function of (seed, m). Every
    epoch passes each window once; a global batch of ``batch_size x world`` windows is dealt out to the ranks."""

    def __init__(self, lengths: np.ndarray, batch_size: int, world: int, seed: int, group_by_length: bool):
        self.lengths, self.global_batch, self.world = lengths, batch_size * world, world
        self.seed, self.group_by_length = seed, group_by_length
        self.n_batches = math.ceil(len(lengths) / self.global_batch)
        self._epoch, self._batches = None, []

    def rows(self, m: int, rank: int) -> np.ndarray:
        epoch, index = divmod(m, self.n_batches)
        if self._epoch != epoch:
            self._epoch = epoch
            self._batches = epoch_batches(self.lengths, self.global_batch, self.seed, epoch, self.group_by_length)
        rows = self._batches[index][rank :: self.world]
        return rows if len(rows) else self._batches[index][:1]  # a short last batch: every rank steps together


class Prefetcher:
    """Collates the batches of micro-steps ``[start, stop)`` in a background thread, ``depth`` ahead, in pinned
    memory on a GPU, so the device never waits for the host to pad a batch. The order is the same pure
    function of (seed, step) as without it."""

    def __init__(self, make: Callable[[int], tuple[int, dict]], start: int, stop: int, depth: int = 4,
                 pin: bool = False):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(make, start, stop, pin), daemon=True)
        self._thread.start()

    def _fill(self, make, start, stop, pin):
        try:
            for m in range(start, stop):
                rows, batch = make(m)
                if pin:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                while not self._closed.is_set():
                    try:
                        self._queue.put((rows, batch), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the training thread, which raises it
            self._queue.put(e)

    def next(self) -> tuple[int, dict]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
