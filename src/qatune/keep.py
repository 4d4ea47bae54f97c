"""The model a run keeps: the step with the best validation F1 (``keep = "best"``) or the last, and early stopping.

Pure rules on the learning curve (the validation points so far) beside the files that keep a best step's weights
(``checkpoints/best-<step>/``), so that a resumed run finds the best step its restored curve names.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from qatune.checkpoints import trainable_state
from qatune.errors import TrainingError


def best_point(curve: list[dict]) -> dict | None:
    """The point with the highest F1 (the first of equals: a later step must do better to be kept)."""
    best = None
    for p in curve:
        if best is None or p["f1"] > best["f1"]:
            best = p
    return best


def stalled(curve: list[dict], patience: int) -> bool:
    """Early stopping: the last ``patience`` evaluations did not beat the best before them (0: never)."""
    return bool(patience and curve and len(curve) - 1 - curve.index(best_point(curve)) >= patience)


BEST = "best-"  # checkpoints/best-<step>/: the trainable weights of a best validation step (keep = "best")


def save_best(ckpt_dir: Path, step: int, model, point: dict) -> None:
    """Atomically keep the trainable weights of ``step``, the best validation step so far, with its curve point.
    Earlier best steps stay until a checkpoint passes this one (:func:`prune_best`): a resume from an earlier
    checkpoint still finds the best step it knows."""
    from safetensors.torch import save_file

    final, tmp = ckpt_dir / f"{BEST}{step}", ckpt_dir / f".{BEST}{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
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

    path = ckpt_dir / f"{BEST}{step}" / "trainable.safetensors"
    try:
        return load_file(str(path))
    except (OSError, ValueError) as e:
        raise TrainingError(f"{path}: the weights of the best validation step {step} cannot be read "
                            f"({type(e).__name__}); train the run again without --resume") from e
