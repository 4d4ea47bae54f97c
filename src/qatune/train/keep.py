"""The model a run keeps: the step with the best validation F1 (``keep = "best"``) or the last, and early stopping.

Pure rules on the learning curve (the validation points so far) beside the files that keep a best step's weights
(``checkpoints/best-<step>/``), so that a resumed run finds the best step its restored curve names.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from qatune.errors import TrainingError
from qatune.rundir import BEST, TRAINABLE

if TYPE_CHECKING:  # the pure rules are read by the study driver, which has no model stack
    import torch


def best_point(curve: list[dict]) -> dict | None:
    """The point with the highest F1 (the first of equals: a later step must do better to be kept)."""
    best = None
    for p in curve:
        if best is None or p["f1"] > best["f1"]:
            best = p
    return best


def kept_point(curve: list[dict], keep: str) -> dict | None:
    """The point of the model a run keeps: its best (``keep = "best"``) or its last."""
    return best_point(curve) if keep == "best" else (curve[-1] if curve else None)


def stalled(curve: list[dict], patience: int) -> bool:
    """Early stopping: the last ``patience`` evaluations did not beat the best before them (0: never)."""
    return bool(patience and curve and len(curve) - 1 - curve.index(best_point(curve)) >= patience)




def save_best(ckpt_dir: Path, step: int, model, point: dict) -> None:
    """Atomically keep the trainable weights of ``step``, the best validation step so far, with its curve point.
    Earlier best steps stay until a checkpoint passes this one (:func:`prune_best`): a resume from an earlier
    checkpoint still finds the best step it knows."""
    from safetensors.torch import save_file

    from qatune.train.checkpoints import trainable_state

    final, tmp = ckpt_dir / f"{BEST}{step}", ckpt_dir / f".{BEST}{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / TRAINABLE))
    (tmp / "point.json").write_text(json.dumps(point), encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def best_steps(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix(BEST)) for p in ckpt_dir.glob(f"{BEST}*") if p.name[len(BEST):].isdigit())


def prune_best(ckpt_dir: Path, keep: int | None = None, after: int | None = None) -> None:
    """Remove best-step weights other than ``keep``'s (after a checkpoint passed it), or those beyond step
    ``after`` (a resume from an earlier checkpoint makes them again)."""
    for step in best_steps(ckpt_dir):
        if (keep is not None and step != keep) or (after is not None and step > after):
            shutil.rmtree(ckpt_dir / f"{BEST}{step}", ignore_errors=True)


def read_best(ckpt_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The trainable weights kept for best step ``step``."""
    from safetensors.torch import load_file

    path = ckpt_dir / f"{BEST}{step}" / TRAINABLE
    try:
        return load_file(str(path))
    except (OSError, ValueError) as e:
        raise TrainingError(f"{path}: the weights of the best validation step {step} cannot be read "
                            f"({type(e).__name__}); train the run again without --resume") from e


class Keeper:
    """A run's choice of model over its validation curve (``curve``, the list the recipe appends to): the best step
    (``keep = "best"``) or the last, early stopping, and the best step's weights on disk across a resume."""

    def __init__(self, keep: str, patience: int, ckpt_dir: Path, curve: list[dict]):
        self.keep, self.patience, self.dir, self.curve = keep, patience, ckpt_dir, curve

    @property
    def best(self) -> dict | None:
        return best_point(self.curve)

    def stalled(self) -> bool:
        return stalled(self.curve, self.patience)

    def kept(self) -> dict | None:
        """The curve point of the model the run keeps."""
        return kept_point(self.curve, self.keep)

    def restore(self, start_step: int) -> None:
        """On resume: the best step's weights the restored curve names must be here; later ones are made again."""
        if self.keep != "best":
            return
        prune_best(self.dir, after=start_step)
        if self.best is not None and self.best["step"] not in best_steps(self.dir):
            raise TrainingError(f"{self.dir}: the weights of the best validation step {self.best['step']} are "
                                f"missing, so keep = best cannot be honoured; train the run again without --resume "
                                f"(or in a new --output-dir)")

    def add(self, point: dict, model) -> None:
        """A new validation point; its weights are kept when it beats the best so far."""
        if self.keep == "best" and (self.best is None or point["f1"] > self.best["f1"]):
            save_best(self.dir, point["step"], model, point)
        self.curve.append(point)

    def checkpointed(self) -> None:
        """A checkpoint was written: a resume from it needs no best step before the current best."""
        if self.keep == "best" and self.best is not None:
            prune_best(self.dir, keep=self.best["step"])

    def load_kept(self, module, end_step: int) -> dict | None:
        """Put the kept step's weights into ``module`` (it holds ``end_step``'s); returns the kept point."""
        from qatune.train.checkpoints import load_weights

        kept = self.kept()
        if kept is not None and kept["step"] != end_step:
            load_weights(module, read_best(self.dir, kept["step"]))
        return kept
