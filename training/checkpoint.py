"""The one checkpoint format of every kind of model, and how to read it back.

A run directory holds:

- `checkpoint.pt`: the best evaluated model, what `rnnserve export` and `rnnserve sample` read. A plain
  dict (no pickled modules; `torch.load(..., weights_only=True)` loads it):
  `format` (CHECKPOINT_FORMAT), `kind` (the task: "lm", "classifier", ...), `model_args` (the model's
  constructor arguments, a dict), `config` (the training config, a dict), `state_dict`, `metrics` (the
  evaluation that made it the best), `history` (the evaluations so far), plus the task's own entries
  (`tokenizer_kind`; a classifier's `labels`, `raw_labels`, `special_tokens`).
- `tokenizer.json` beside it (HF tokenizers).
- `last.pt`: the whole run state for `--resume` (kind "<kind>-last"): the above without metrics, plus
  the optimiser, schedule, RNG streams, `progress` and the task's run state (e.g. an LM's carried state).

Checkpoints written before `kind` existed are language models (`checkpoint_kind`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from rnnserve.training.runstate import LAST_FILE, save_atomically

CHECKPOINT_FORMAT = 1
CHECKPOINT_FILE = "checkpoint.pt"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
LAST_SUFFIX = "-last"  # the kind of a run's last.pt: "lm-last", "classifier-last", ...
KIND_NAMES = {"lm": "language model", "classifier": "classifier", "dialogue": "dialogue model"}


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights, detached, on the CPU (what a checkpoint stores)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def model_checkpoint(
    kind: str,
    model_args: dict[str, Any],
    config: dict[str, Any],
    model: nn.Module,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """The dict of a `checkpoint.pt` (`extra`: the task's own entries)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "kind": kind,
        "model_args": model_args,
        "config": config,
        "state_dict": cpu_state_dict(model),
        "metrics": metrics,
        "history": list(history),
        **extra,
    }


def save_model_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write a `model_checkpoint` dict atomically (a crash never leaves half a file)."""
    save_atomically(checkpoint, path)


def checkpoint_kind(ckpt: dict[str, Any]) -> str:
    """ "lm", "classifier", ...: what a loaded checkpoint dict holds (older LM checkpoints have no `kind`)."""
    return str(ckpt.get("kind", "lm"))


def load_model_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint dict that holds a model to export or sample from; errors that say what to do else
    (a missing file, a run's `last.pt`, something that is not ours)."""
    if not path.is_file():
        hint = ""
        if (path.parent / LAST_FILE).is_file():
            hint = (
                f"; {path.parent} holds a run stopped before its first evaluation: continue it with "
                f"`rnnserve train ... --out {path.parent} --resume` (stopping again writes {path.name})"
            )
        raise FileNotFoundError(f"{path} does not exist{hint}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a format-{CHECKPOINT_FORMAT} rnnserve checkpoint")
    if checkpoint_kind(ckpt).endswith(LAST_SUFFIX):
        raise ValueError(
            f"{path} is a run's training state (for `--resume`), not a model checkpoint: use "
            f"{path.parent / CHECKPOINT_FILE}, the best evaluated weights of the run"
        )
    return ckpt


def read_checkpoint_kind(path: str | Path) -> str:
    """The kind of the checkpoint file at `path` (see `checkpoint_kind`)."""
    return checkpoint_kind(load_model_checkpoint(Path(path)))


def read_checkpoint(path: str | Path, kind: str) -> tuple[dict[str, Any], Tokenizer]:
    """A checkpoint of `kind` ("lm" | "classifier" | ...) and the tokenizer.json beside it; clear errors
    else."""
    path = Path(path)
    ckpt = load_model_checkpoint(path)
    if checkpoint_kind(ckpt) != kind:
        raise ValueError(
            f"{path} is a {checkpoint_kind(ckpt)} checkpoint, not a {KIND_NAMES.get(kind, kind)}"
        )
    tok_path = path.parent / TOKENIZER_FILE
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path} (the checkpoint's tokenizer) does not exist")
    return ckpt, Tokenizer.from_file(str(tok_path))


def run_checkpoint(
    kind: str,
    model_args: dict[str, Any],
    config: dict[str, Any],
    model: nn.Module,
    run: dict[str, Any],
    task_state: dict[str, Any],
) -> dict[str, Any]:
    """The dict of a run's `last.pt` (kind "<kind>-last"): `run` holds the skeleton's entries (optimizer,
    scheduler, rng, progress, grad_scaler, rng_ranks), `task_state` the task's (e.g. an LM's `hidden`)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "kind": kind + LAST_SUFFIX,
        "model_args": model_args,
        "config": config,
        "state_dict": cpu_state_dict(model),
        **run,
        **task_state,
    }
