"""What each optimizer step of a run costs in counted FLOPs, known before it trains: its batches are a pure function
of (seed, step) (:class:`qatune.data.batches.BatchPlan`), so a resumed run counts exactly as an uninterrupted one, a
learning-curve point knows its compute, and a FLOPs budget is a step count."""

from __future__ import annotations

from qatune.data.batches import BatchPlan
from qatune.data.features import batch_width
from qatune.model.flops import WindowFlops


class StepCosts:
    """Counted training FLOPs of a run's steps over every rank (``world``), each micro-batch at its padded width."""

    def __init__(self, plan: BatchPlan, lengths, per_window: WindowFlops, grad_accum: int, world: int,
                 max_seq_length: int, pad_to_max_length: bool, pad_multiple: int):
        self.plan, self.lengths, self.per_window, self.world = plan, lengths, per_window, world
        self.grad_accum, self.max_seq_length, self.pad_to_max = grad_accum, max_seq_length, pad_to_max_length
        self.pad_multiple = pad_multiple
        self._memo = (0, 0)  # (step, FLOPs of steps [0, step)): a run's curve costs one pass over its batches

    def step(self, step: int) -> int:
        total = 0
        for m in range(step * self.grad_accum, (step + 1) * self.grad_accum):
            for rank in range(self.world):
                rows = self.plan.rows(m, rank)
                width = batch_width(self.lengths[rows], self.max_seq_length, self.pad_to_max, self.pad_multiple)
                total += self.per_window.train(len(rows), width)
        return total

    def between(self, first_step: int, last_step: int) -> int:
        """Steps [first_step, last_step)."""
        return sum(self.step(k) for k in range(first_step, last_step))

    def through(self, step: int) -> int:
        """Steps [0, step), carried on from the last call."""
        done, total = self._memo if self._memo[0] <= step else (0, 0)
        total += self.between(done, step)
        self._memo = (step, total)
        return total

    def steps_for(self, budget: float) -> int:
        """The steps a FLOPs budget buys: up to the first at which the counted FLOPs reach it."""
        total, steps = 0, 0
        while total < budget:
            total += self.step(steps)
            steps += 1
        return steps
