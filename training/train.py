"""Train a recurrent language model with truncated BPTT and save the best checkpoint.

Run it as `rnnserve train lm --out runs/lm` (see `rnnserve.training.cli`), or from Python:
`train_language_model(TrainConfig(out_dir="runs/lm"))`. The checkpoint is a plain dict (no pickled
modules, loadable with `torch.load(..., weights_only=True)`) with `tokenizer.json` written beside it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor
from tqdm import tqdm

from rnnserve.training.config import TrainConfig
from rnnserve.training.data import default_corpus_documents, load_documents, split_stream
from rnnserve.training.model import ModelArgs, RNNLanguageModel, State, detach_state
from rnnserve.training.tokenizer import TOKENIZER_KINDS, build_tokenizer, special_token_ids

__all__ = ["TrainConfig", "encode_documents", "load_checkpoint", "train_language_model"]

CHECKPOINT_FORMAT = 1
CHECKPOINT_FILE = "checkpoint.pt"
TOKENIZER_FILE = "tokenizer.json"


def encode_documents(tok: Tokenizer, docs: list[str]) -> list[int]:
    """One token stream: each document's ids followed by `<eos>`."""
    eos = special_token_ids(tok)["eos"]
    stream: list[int] = []
    for enc in tok.encode_batch(docs):
        stream.extend(enc.ids)
        stream.append(eos)
    return stream


def batchify(stream: list[int], batch: int) -> Tensor:
    """Lay a stream out as `batch` contiguous rows: (batch, len(stream) // batch) int64."""
    n = len(stream) // batch
    if n < 2:
        raise ValueError(f"a stream of {len(stream)} tokens is too short for {batch} parallel streams")
    return torch.tensor(stream[: n * batch], dtype=torch.long).view(batch, n)


def windows(data: Tensor, bptt: int) -> list[tuple[Tensor, Tensor]]:
    """Consecutive (input, target) windows along time; each (batch, <=bptt), target shifted by one."""
    return [(data[:, i : i + bptt], data[:, i + 1 : i + 1 + bptt]) for i in range(0, data.shape[1] - 1, bptt)]


def _loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy; logits (batch, seq, vocab), targets (batch, seq)."""
    seq = targets.shape[1]
    return F.cross_entropy(logits[:, :seq].reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: RNNLanguageModel, data: Tensor, bptt: int) -> float:
    """Mean per-token loss over `data` (batch, time), carrying state across windows."""
    model.eval()
    state: State = model.init_state(data.shape[0], data.device)
    total, count = 0.0, 0
    for x, y in windows(data, bptt):
        x = x[:, : y.shape[1]]
        logits, state = model(x, state)
        total += _loss(logits, y).item() * y.numel()
        count += y.numel()
    return total / max(count, 1)


def device_for(name: str) -> torch.device:
    """The torch device a config names: "cpu", "cuda", or "auto" (cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _prepare_data(config: TrainConfig) -> tuple[Tokenizer, list[int], list[int]]:
    """Documents -> tokenizer (built on all text) -> stream split into (train, validation)."""
    if config.tokenizer not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer must be one of {TOKENIZER_KINDS}, got {config.tokenizer!r}")
    if config.data is None:
        docs = default_corpus_documents(max_chars=config.max_chars)
    else:
        docs = load_documents(config.data)
    tok = build_tokenizer(config.tokenizer, docs, min_count=config.min_count, max_size=config.max_vocab)
    train_ids, val_ids = split_stream(encode_documents(tok, docs), config.val_fraction)
    if config.max_eval_tokens is not None:
        val_ids = val_ids[: config.max_eval_tokens]
    return tok, train_ids, val_ids


def _model_args(config: TrainConfig, vocab_size: int) -> ModelArgs:
    return ModelArgs(
        cell=config.cell,
        vocab_size=vocab_size,
        embedding_size=config.emb,
        hidden_size=config.hidden,
        num_layers=config.layers,
        dropout=config.dropout,
        tie_weights=config.tie_weights,
    )


def _train_epoch(
    model: RNNLanguageModel, opt: torch.optim.Optimizer, data: Tensor, config: TrainConfig, epoch: int
) -> float:
    """One truncated-BPTT pass; returns the mean training loss."""
    model.train()
    batches = windows(data, config.bptt)
    if config.max_steps_per_epoch is not None:
        batches = batches[: config.max_steps_per_epoch]
    state: State = model.init_state(data.shape[0], data.device)
    total, tokens, start = 0.0, 0, time.perf_counter()
    bar = tqdm(batches, desc=f"epoch {epoch}", disable=not config.progress, unit="step")
    for x, y in bar:
        x = x[:, : y.shape[1]]
        state = detach_state(state)  # truncated BPTT: no gradient into the previous window
        logits, state = model(x, state)
        loss = _loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        opt.step()
        total += loss.item() * y.numel()
        tokens += y.numel()
        mean = total / tokens
        bar.set_postfix(
            loss=f"{mean:.3f}",
            ppl=f"{math.exp(min(mean, 50)):.1f}",
            tok_s=f"{tokens / (time.perf_counter() - start):.0f}",
        )
    return total / max(tokens, 1)


def train_language_model(config: TrainConfig) -> Path:
    """Train as configured; returns the best checkpoint's path (tokenizer.json is beside it)."""
    torch.manual_seed(config.seed)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = device_for(config.device)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok, train_ids, val_ids = _prepare_data(config)
    tok.save(str(out / TOKENIZER_FILE))
    train_data = batchify(train_ids, config.batch_size).to(device)  # (batch, time)
    val_data = batchify(val_ids, config.eval_batch_size).to(device)  # (eval_batch, time)
    args = _model_args(config, tok.get_vocab_size())
    model = RNNLanguageModel(args).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    path = out / CHECKPOINT_FILE
    best = math.inf
    history: list[dict[str, float]] = []
    for epoch in range(1, config.epochs + 1):
        train_loss = _train_epoch(model, opt, train_data, config, epoch)
        val_loss = evaluate(model, val_data, config.bptt)
        metrics: dict[str, float] = {
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50)),
            "train_loss": train_loss,
            "epoch": epoch,
        }
        history.append(metrics)
        if config.progress:
            tqdm.write(
                f"epoch {epoch}: train loss {train_loss:.3f}, val loss {val_loss:.3f}, "
                f"val ppl {metrics['val_ppl']:.2f}"
            )
        if val_loss < best or not path.exists():
            best = val_loss
            save_checkpoint(path, model, config, metrics, history)
    return path


def save_checkpoint(
    path: Path,
    model: RNNLanguageModel,
    config: TrainConfig,
    metrics: dict[str, Any],
    history: list[dict[str, float]] | None = None,
) -> None:
    """Write the plain-dict checkpoint atomically (`history`: the metrics of every epoch so far)."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "kind": "lm",
        "model_args": asdict(model.args),
        "config": asdict(config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metrics": metrics,
        "tokenizer_kind": config.tokenizer,
        "history": list(history or [metrics]),
    }
    tmp = path.with_suffix(".pt.tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def checkpoint_kind(ckpt: dict[str, Any]) -> str:
    """ "lm" or "classifier": what a loaded checkpoint dict holds (older LM checkpoints have no `kind`)."""
    return str(ckpt.get("kind", "lm"))


def read_checkpoint_kind(path: str | Path) -> str:
    """The kind of the checkpoint file at `path` (see `checkpoint_kind`)."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a format-{CHECKPOINT_FORMAT} rnnserve checkpoint")
    return checkpoint_kind(ckpt)


def load_checkpoint(path: str | Path) -> tuple[RNNLanguageModel, Tokenizer, dict[str, Any]]:
    """(model in eval mode on CPU, tokenizer from tokenizer.json beside it, the checkpoint dict)."""
    ckpt, tokenizer = read_checkpoint(path, "lm")
    model = RNNLanguageModel(ModelArgs(**ckpt["model_args"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), tokenizer, ckpt


def read_checkpoint(path: str | Path, kind: str) -> tuple[dict[str, Any], Tokenizer]:
    """A checkpoint of `kind` ("lm" | "classifier") and the tokenizer.json beside it; clear errors else."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a format-{CHECKPOINT_FORMAT} rnnserve checkpoint")
    if checkpoint_kind(ckpt) != kind:
        names = {"lm": "language model", "classifier": "classifier"}
        raise ValueError(f"{path} is a {checkpoint_kind(ckpt)} checkpoint, not a {names.get(kind, kind)}")
    tok_path = path.parent / TOKENIZER_FILE
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path} (the checkpoint's tokenizer) does not exist")
    return ckpt, Tokenizer.from_file(str(tok_path))
