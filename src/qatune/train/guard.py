"""Non-finite losses caught on the device without a host sync: a flag that the fused AdamW kernel reads as
``found_inf`` (as AMP's GradScaler does), so the step that saw one and every later step leave the weights untouched,
and the run stops with the step and its last good checkpoint at the next check."""

from __future__ import annotations

import torch

from qatune.errors import TrainingError


class LossGuard:
    def __init__(self, device: torch.device, grad_accum: int, reduce=None):
        self.bad = torch.zeros((), device=device)  # sticky: 1.0 once any loss was non-finite (the optimizer's found_inf)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # the first such micro-batch
        self.bad_loss = torch.zeros((), device=device)
        self.grad_accum, self.reduce = grad_accum, reduce  # reduce: sums the flag over data-parallel ranks

    def flag(self, loss: torch.Tensor, micro_batch: int) -> None:
        """Record a non-finite loss of ``micro_batch`` on the device; every rank sees the same flag."""
        now = (~torch.isfinite(loss.detach())).float()
        if self.reduce is not None:
            now = self.reduce(now.reshape(1)).reshape(())
        first = (now > 0) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(first, torch.full_like(self.first_bad, micro_batch), self.first_bad))
        self.bad_loss.copy_(torch.where(first, loss.detach().float(), self.bad_loss))
        self.bad.copy_(torch.maximum(self.bad, (now > 0).float()))

    def check(self, last_checkpoint) -> None:
        """Raise when a loss was non-finite (reads the flag: a host sync)."""
        if not bool(self.bad.item()):
            return
        step, micro = divmod(int(self.first_bad.item()), self.grad_accum)
        raise TrainingError(
            f"non-finite loss ({self.bad_loss.item()}) at step {step + 1} (micro-batch {micro + 1}); the weights "
            f"were not updated from then on. Last good checkpoint: "
            f"{last_checkpoint or 'none (the run had not saved yet)'}. "
            f"Lower --learning-rate, use --precision fp32, or check the data.")
