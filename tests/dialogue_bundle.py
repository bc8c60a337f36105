"""A tiny dialogue bundle for tests: a random-weight HRED/VHRED with a char tokenizer, exported for real.

    from dialogue_bundle import make_dialogue_bundle
    bundle = make_dialogue_bundle(tmp_path / "repo", name="chat", cell="lstm", seed=0)

The bundle is what `rnnserve export` writes for a dialogue checkpoint (validated step, last, turn,
turn_last, encoder, context and decoder graphs, manifest, tokenizer.json), so a server can load it like
any other model. The weights are random (seeded): the replies are gibberish, but every computation is the
real one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.training.dialogue_checkpoint import save_dialogue_checkpoint
from rnnserve.training.dialogue_model import DialogueArgs, DialogueModel
from rnnserve.training.tokenizer import build_tokenizer, special_token_ids

# The tokenizer's characters: every one a test may type (letters, digits, punctuation, space, newline).
DIALOGUE_TEXT = (
    "hello there! how are you today?\nfine, thanks. and you?\n"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,;:!?'\"-()\n"
)


def make_dialogue_checkpoint(
    run_dir: Path, cell: str = "lstm", seed: int = 0, *, latent_dim: int = 0, bidirectional: bool = False
) -> Path:
    """Write `run_dir/checkpoint.pt` (and tokenizer.json beside it) of a random tiny dialogue model."""
    tok = build_tokenizer("char", DIALOGUE_TEXT)
    torch.manual_seed(seed)
    args = DialogueArgs(
        cell=cell,
        vocab_size=tok.get_vocab_size(),
        embedding_size=8,
        encoder_hidden=12,
        context_hidden=10,
        decoder_hidden=16,
        num_layers=2,
        encoder_bidirectional=bidirectional,
        latent_dim=latent_dim,
        dropout=0.0,
        eos_id=special_token_ids(tok)["eos"],
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "checkpoint.pt"
    save_dialogue_checkpoint(path, DialogueModel(args).eval(), tok, {"valid_loss": 4.0})
    return path


def make_dialogue_bundle(
    repo_dir: Path,
    name: str = "chat",
    cell: str = "lstm",
    seed: int = 0,
    *,
    latent_dim: int = 0,
    version: str | None = None,
) -> Path:
    """Export a random tiny dialogue model (`latent_dim > 0`: VHRED) to `<repo_dir>/<name>/<version>/`
    (the next version by default); returns the bundle directory."""
    with tempfile.TemporaryDirectory() as run:
        checkpoint = make_dialogue_checkpoint(Path(run), cell, seed, latent_dim=latent_dim)
        return export_checkpoint(checkpoint, Path(repo_dir), name, version)
