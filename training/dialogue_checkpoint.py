"""The dialogue model's checkpoint: the shared format (training/checkpoint.py) with kind "dialogue",
`model_args` = asdict(DialogueArgs), and the tokenizer as tokenizer.json beside it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from rnnserve.training.checkpoint import (
    TOKENIZER_FILE,
    model_checkpoint,
    read_checkpoint,
    save_model_checkpoint,
)
from rnnserve.training.dialogue_model import DialogueArgs, DialogueModel
from rnnserve.training.tokenizer import special_token_ids

DIALOGUE_KIND = "dialogue"  # the checkpoint's `kind`


def save_dialogue_checkpoint(
    path: Path,
    model: DialogueModel,
    tokenizer: Tokenizer,
    metrics: dict[str, Any],
    *,
    tokenizer_kind: str = "char",
    config: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
) -> None:
    """Write `path` in the shared checkpoint format (training/checkpoint.py: kind "dialogue",
    model_args = asdict(DialogueArgs), state_dict, metrics, ... plus tokenizer_kind and special_tokens),
    atomically, and the tokenizer as tokenizer.json beside it (where every run keeps it)."""
    specials = special_token_ids(tokenizer)
    if specials["eos"] != model.args.eos_id or tokenizer.get_vocab_size() != model.args.vocab_size:
        raise ValueError(
            f"the tokenizer (<eos> {specials['eos']}, {tokenizer.get_vocab_size()} tokens) does not match "
            f"the model (eos_id {model.args.eos_id}, vocab_size {model.args.vocab_size})"
        )
    path = Path(path)
    ckpt = model_checkpoint(
        DIALOGUE_KIND, asdict(model.args), dict(config or {}), model, dict(metrics), list(history or []),
        tokenizer_kind=tokenizer_kind, special_tokens=specials,
    )  # fmt: skip
    save_model_checkpoint(path, ckpt)
    tokenizer.save(str(path.parent / TOKENIZER_FILE))


def load_dialogue_checkpoint(path: str | Path) -> tuple[DialogueModel, Tokenizer, dict[str, Any]]:
    """(model in eval mode on CPU, tokenizer from tokenizer.json beside it, the checkpoint dict)."""
    ckpt, tokenizer = read_checkpoint(path, DIALOGUE_KIND)
    model = DialogueModel(DialogueArgs(**ckpt["model_args"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), tokenizer, ckpt
