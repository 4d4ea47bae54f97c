"""Training FLOPs counted, not assumed, and what else was running: costs that do not depend on the machine's load.

A window of ``w`` tokens costs ``a*w + b*w**2`` FLOPs in the forward pass and likewise in the backward pass:
every linear layer scales with the tokens, attention (QK^T and AV) with their square, and nothing else
multiplies matrices. ``torch.utils.flop_counter.FlopCounterMode`` counts one window at two widths on the
run's architecture built on the meta device (with its strategy: LoRA's frozen weights compute no weight gradients),
which fixes ``a`` and ``b`` exactly; a run then sums the cost of the batches it really trained, padding
included, since the model computes on it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction

COUNT_WIDTHS = (8, 16)  # any two widths determine a*w + b*w^2


@dataclass(frozen=True)
class WindowFlops:
    """FLOPs of one window as a function of its padded width ``w``: ``a*w + b*w**2``, forward and backward."""

    fwd_a: Fraction
    fwd_b: Fraction
    bwd_a: Fraction
    bwd_b: Fraction

    def forward(self, width: int) -> int:
        return int(self.fwd_a * width + self.fwd_b * width * width)

    def backward(self, width: int) -> int:
        return int(self.bwd_a * width + self.bwd_b * width * width)

    def train(self, rows: int, width: int) -> int:
        """A training micro-batch of ``rows`` windows padded to ``width``: forward + backward."""
        return rows * (self.forward(width) + self.backward(width))


def count_window(model, width: int) -> tuple[int, int]:
    """Forward and backward FLOPs of one window of ``width`` tokens through ``model`` (counted; the caller's
    random state is left untouched and no gradient stays behind)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from qatune.models import random_batch

    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        batch = random_batch(model, 1, width, torch.device("cpu"))
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
    """``a`` and ``b`` from counts at two widths (exact: the cost has no other terms)."""
    (w1, w2) = COUNT_WIDTHS
    (f1, g1), (f2, g2) = count_window(model, w1), count_window(model, w2)

    def solve(c1: int, c2: int) -> tuple[Fraction, Fraction]:
        b = Fraction(c2 * w1 - c1 * w2, w1 * w2 * (w2 - w1))
        return Fraction(c1, w1) - b * w1, b

    return WindowFlops(*solve(f1, f2), *solve(g1, g2))


@functools.lru_cache(maxsize=256)
def window_flops(model_name: str, strategy: str, rank: int, alpha: float, policy: str, targets: tuple,
                 num_layers: int | None = None) -> WindowFlops:
    """The run shape's per-window FLOPs, counted on its architecture built from its config on the meta device
    (shapes only: no memory, no arithmetic, the same counts)."""
    from qatune.models import meta_model

    return fit(meta_model(model_name, strategy, rank, alpha, policy, targets, num_layers))


def for_config(cfg) -> WindowFlops:
    return window_flops(cfg.model, cfg.strategy, cfg.lora_rank, cfg.lora_alpha, cfg.alpha_policy,
                        tuple(cfg.lora_targets or ()), getattr(cfg, "num_layers", None))
