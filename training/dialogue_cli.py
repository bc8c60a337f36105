"""`rnnserve train dialogue`: train an HRED/VHRED dialogue model (training/dialogue_train.py).

    rnnserve train dialogue --data shakespeare --hidden 256 --minutes 10 --out runs/chat
    rnnserve train dialogue --data chats.jsonl --latent 32 --kl-anneal-steps 2000 --steps 5000 --out runs/v

`register(kinds)` adds the subcommand to the subparsers under `rnnserve train`. `DialogueTrainConfig`
lives here, so that registering the flags (and their defaults) never imports torch.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, fields
from typing import Any

from rnnserve.cells import CELLS

# dialogue_data's (kept here: that module imports torch)
DEFAULT_TURNS_PER_DIALOGUE = 8
DEFAULT_MAX_TURN_CHARS = 500
FORMATS: tuple[str, ...] = ("auto", "shakespeare", "turns", "jsonl", "chatterbot")


@dataclass
class DialogueTrainConfig:
    """Everything `rnnserve train dialogue` takes (saved in the checkpoint's `config`)."""

    data: str = "shakespeare"  # "shakespeare", "chatterbot" (fetched into the data cache) or a path
    format: str = "auto"  # FORMATS (dialogue_data.read_dialogues)
    turns_per_dialogue: int = DEFAULT_TURNS_PER_DIALOGUE  # Tiny Shakespeare only
    max_turn_chars: int = DEFAULT_MAX_TURN_CHARS  # Tiny Shakespeare only
    split_seed: int = 0
    cell: str = "lstm"
    layers: int = 1  # of each stack
    emb: int = 64
    hidden: int = 256  # the decoder's (and, unless set, the encoder's and the context's)
    encoder_hidden: int = 0  # 0: `hidden`
    context_hidden: int = 0  # 0: `hidden`
    bidirectional: bool = False  # a bidirectional utterance encoder (trains and exports, cannot be served)
    latent: int = 0  # VHRED's latent size; 0: HRED
    kl_anneal_steps: int = 2000  # the KL weight rises linearly from 0 to 1 over these steps
    dropout: float = 0.1
    batch_size: int = 16  # dialogues per step
    epochs: int = 20
    lr: float = 2e-3
    clip: float = 1.0
    steps: int | None = None  # stop after this many steps in all (evaluated at the last)
    minutes: float | None = None  # training time budget; then evaluate and end normally
    eval_every: int = 0  # evaluate every this many steps (0: at each epoch's end)
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    out_dir: str = "runs/dialogue"
    resume: bool = False
    force: bool = False
    save_every: int = 200
    progress: bool = True


_D = {f.name: f.default for f in fields(DialogueTrainConfig)}
# flag -> config field, where they differ
_RENAMED = {"out": "out_dir"}


def register(kinds: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `dialogue` to the subparsers of `rnnserve train`; returns its parser."""
    p = kinds.add_parser(
        "dialogue",
        help="train an HRED (or VHRED with --latent) dialogue model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Dialogues: --data shakespeare (Tiny Shakespeare, each speech a turn), chatterbot (the "
        "chatterbot-corpus, fetched into the data cache), or a path: a text file with one turn per line and "
        'a blank line between dialogues, a .jsonl file ({"turns": [...]} or a list per line), or a '
        "chatterbot-corpus wheel/folder. The best checkpoint has the lowest per-token perplexity of the "
        "held-out responses (turns 2+ of the validation dialogues, each with its <eos>).",
    )
    _add_data_arguments(p)
    _add_model_arguments(p)
    _add_run_arguments(p)
    p.set_defaults(func=run_train_dialogue)
    return p


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=_D["data"], help="shakespeare | chatterbot | PATH")
    p.add_argument("--format", choices=FORMATS, default=_D["format"], help="how to read a PATH")
    p.add_argument(
        "--turns-per-dialogue",
        type=int,
        default=_D["turns_per_dialogue"],
        help="Tiny Shakespeare: consecutive speeches per dialogue",
    )
    p.add_argument(
        "--max-turn-chars",
        type=int,
        default=_D["max_turn_chars"],
        help="Tiny Shakespeare: longer speeches keep the first lines that fit (0: no cap)",
    )
    p.add_argument("--split-seed", type=int, default=_D["split_seed"], help="the 90/5/5 split's shuffle")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cell", choices=CELLS, default=_D["cell"], help="of the three stacks")
    p.add_argument("--layers", type=int, default=_D["layers"], help="of each stack")
    p.add_argument("--emb", type=int, default=_D["emb"], help="embedding size (encoder and decoder share it)")
    p.add_argument("--hidden", type=int, default=_D["hidden"], help="the decoder's hidden size")
    p.add_argument("--encoder-hidden", type=int, default=_D["encoder_hidden"], help="0: --hidden")
    p.add_argument("--context-hidden", type=int, default=_D["context_hidden"], help="0: --hidden")
    p.add_argument(
        "--bidirectional",
        action="store_true",
        help="bidirectional utterance encoder (trains and exports, cannot be served)",
    )
    p.add_argument("--latent", type=int, default=_D["latent"], help="VHRED's latent size (0: HRED)")
    p.add_argument(
        "--kl-anneal-steps",
        type=int,
        default=_D["kl_anneal_steps"],
        help="VHRED: the KL weight rises linearly from 0 to 1 over these steps",
    )
    p.add_argument("--dropout", type=float, default=_D["dropout"])


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=_D["batch_size"], help="dialogues per step")
    p.add_argument("--epochs", type=int, default=_D["epochs"])
    p.add_argument("--lr", type=float, default=_D["lr"], help="Adam's learning rate")
    p.add_argument("--clip", type=float, default=_D["clip"], help="gradient-norm clip")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="stop after this many steps (evaluated at the last)")
    budget.add_argument("--minutes", type=float, help="training time budget, then evaluate and stop")
    p.add_argument("--eval-every", type=int, default=_D["eval_every"], help="steps (0: each epoch's end)")
    p.add_argument("--seed", type=int, default=_D["seed"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default=_D["device"], help="cpu | cuda | auto")
    p.add_argument("--out", default=_D["out_dir"], help="the run directory (checkpoint.pt, last.pt)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--force", action="store_true", help="start a new run over the one in --out")
    p.add_argument("--save-every", type=int, default=_D["save_every"], help="write last.pt every N steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> DialogueTrainConfig:
    """The config the parsed flags describe."""
    given = {_RENAMED.get(k, k): v for k, v in vars(args).items()}
    given["progress"] = not given.pop("no_progress", False)
    names = {f.name for f in fields(DialogueTrainConfig)}
    return DialogueTrainConfig(**{k: v for k, v in given.items() if k in names})


def resumed_config(args: argparse.Namespace) -> DialogueTrainConfig:
    """The config saved in `--out`'s last.pt (its step bound dropped; --minutes, if given, is new)."""
    from rnnserve.training.runstate import read_run_config

    saved: dict[str, Any] = read_run_config(args.out)
    saved.pop("max_steps", None)
    saved.update(steps=args.steps, minutes=args.minutes, progress=not args.no_progress)
    return DialogueTrainConfig(**saved)


def run_train_dialogue(args: argparse.Namespace) -> int:
    """Train; print the checkpoint, its metrics and how to export it. Returns the exit code."""
    from rnnserve.training.datasets import DataFetchError
    from rnnserve.training.dialogue_train import train_dialogue
    from rnnserve.training.runstate import TrainingStopped

    try:
        config = resumed_config(args) if args.resume else config_from_args(args)
        path = train_dialogue(config)
    except (ValueError, FileNotFoundError, DataFetchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as stop:
        print(f"{stop.reason} at step {stop.step}; the run's state is saved in {stop.last}", file=sys.stderr)
        print(f"continue it with: rnnserve train dialogue --out {args.out} --resume", file=sys.stderr)
        return 130 if stop.reason == "interrupted" else 0
    print(f"checkpoint: {path}")
    print(f"export it with: rnnserve export {path} --repo model_repo --name chat")
    return 0
