"""Training FLOPs counted, not assumed, and what else was running: costs that do not depend on the machine's load.

A window of ``w`` tokens costs ``a*w + b*w**2`` FLOPs in the forward pass and likewise in the backward pass:
every linear layer scales with the tokens, attention (QK^T and AV) with their square; a micro-batch adds ``c``
whatever its size (DoRA's weight norms, computed once per forward pass; 0 for the other methods), and nothing
else multiplies matrices. ``torch.utils.flop_counter.FlopCounterMode`` counts one window at two widths and two
windows at one width on the run's architecture built on the meta device (with its fine-tuning method: frozen
weights compute no weight gradients), which fixes ``a``, ``b`` and ``c`` exactly; a run then sums the cost of the
batches it really trained, padding included, since the model computes on it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction

COUNT_WIDTHS = (8, 16)  # any two widths determine a*w + b*w^2 (and a second window at the first, c)


@dataclass(frozen=True)
class WindowFlops:
    """FLOPs of one window as a function of its padded width ``w``: ``a*w + b*w**2``, forward and backward, and
    ``c`` per micro-batch (forward and backward) whatever its rows."""

    fwd_a: Fraction
    fwd_b: Fraction
    bwd_a: Fraction
    bwd_b: Fraction
    per_batch: int = 0

    def forward(self, width: int) -> int:
        return int(self.fwd_a * width + self.fwd_b * width * width)

    def backward(self, width: int) -> int:
        return int(self.bwd_a * width + self.bwd_b * width * width)

    def train(self, rows: int, width: int) -> int:
        """A training micro-batch of ``rows`` windows padded to ``width``: forward + backward."""
        return rows * (self.forward(width) + self.backward(width)) + self.per_batch


def count_window(model, width: int, rows: int = 1) -> tuple[int, int]:
    """Forward and backward FLOPs of a micro-batch of ``rows`` windows of ``width`` tokens through ``model``
    (counted; the caller's random state is left untouched and no gradient stays behind)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from qatune.model.load import random_batch

    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        batch = random_batch(model, rows, width, torch.device("cpu"))
        # All-ones: changes no FLOPs, and without it the model builds no mask (which meta tensors cannot).
        batch.pop("attention_mask")
        batch = {k: v.to(device) for k, v in batch.items()}
        model.train()
        with FlopCounterMode(display=False) as fwd:
            loss = model(**batch).loss
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return int(fwd.get_total_flops()), int(bwd.get_total_flops())


def fit(model) -> WindowFlops:
    """``a``, ``b`` and ``c`` from three counts (exact: the cost has no other terms): one window at two widths, two
    windows at the first (their difference is one window's cost without ``c``)."""
    (w1, w2) = COUNT_WIDTHS
    (f1, g1), (f2, g2), (f11, g11) = count_window(model, w1), count_window(model, w2), count_window(model, w1, 2)

    def solve(one: int, two: int, pair: int) -> tuple[Fraction, Fraction, int]:
        window = pair - one  # a window at w1 without the micro-batch's constant
        c = one - window
        p1, p2 = window, two - c
        b = Fraction(p2 * w1 - p1 * w2, w1 * w2 * (w2 - w1))
        return Fraction(p1, w1) - b * w1, b, c

    fa, fb, fc = solve(f1, f2, f11)
    ba, bb, bc = solve(g1, g2, g11)
    return WindowFlops(fa, fb, ba, bb, fc + bc)


@functools.lru_cache(maxsize=256)
def window_flops(model_name: str, strategy: str, settings: tuple, num_layers: int | None = None) -> WindowFlops:
    """The run shape's per-window FLOPs, counted on its architecture built from its config on the meta device
    (shapes only: no memory, no arithmetic, the same counts)."""
    from qatune.model.load import meta_model

    return fit(meta_model(model_name, strategy, settings, num_layers))


def for_config(cfg) -> WindowFlops:
    from qatune.methods import method

    return window_flops(cfg.model, cfg.strategy, method(cfg.strategy).key(cfg), getattr(cfg, "num_layers", None))
