"""Issue 18's quality goal: HRED vs a flat LSTM LM on the held-out responses, at equal parameters.

    python bench/dialogue_quality.py --minutes 20 --out docs/bench
    python bench/dialogue_quality.py --from-json R.json --previous OLD.json --out docs/bench  # redraw
    python bench/dialogue_quality.py --quick --out /tmp/dq          # smoke test (seconds)

Both models see the same dialogues (Tiny Shakespeare, training/dialogue_data.py: each speech a turn, 8
consecutive speeches a dialogue, a seeded 90/5/5 split by dialogue), the same char tokenizer (learnt on the
train split) and the same token streams: each dialogue's turns, every turn followed by `<eos>`.
- HRED: `DialogueModel` (training/dialogue_model.py), trained turn-batched on every prediction of the stream
  (sizes: --emb, --enc-hidden, --ctx-hidden, --dec-hidden; by default decoder-heavy: 48/48/64/212, the
  decoder being the part that predicts, the encoder and the context only summarise turns).
- flat: `RNNLanguageModel` (training/model.py), one LSTM stack whose hidden size is picked so that its
  parameter count is the closest to HRED's; it reads each dialogue as one stream from a zero state (state
  reset per dialogue, full backpropagation through the dialogue), trained on every prediction too.
Metric: per-token perplexity of the held-out responses: turns 2+ of the validation dialogues, every token
and each turn's `<eos>`, each predicted from the whole history before it: exactly the same target tokens
and positions for both models (the flat model's predictions at those positions of the stream).

Budget: equal training wall-clock per model (evaluations excluded), on `--threads` CPU threads, seeded. The
two models take turns in slices of `--slice-seconds` so a shared machine's load hits both alike; each is
evaluated on the validation responses every `--eval-seconds` of its own training time, and the final
weights on validation and test. Writes <out>/dialogue_quality.json, .md and .png (validation response
perplexity vs training time).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnserve.training.dialogue_data import (
    DialogueData,
    EncodedDialogue,
    dialogue_batch,
    flat_batch,
    length_batches,
    prepare_dialogue_data,
    read_dialogues,
    response_token_count,
)
from rnnserve.training.dialogue_model import DialogueArgs, DialogueModel
from rnnserve.training.dialogue_train import response_loss
from rnnserve.training.model import ModelArgs, RNNLanguageModel

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-shakespeare" / "input.txt"


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flat_args_matching(target: int, vocab: int, emb: int, layers: int, dropout: float) -> ModelArgs:
    """The flat LSTM LM (emb, layers) whose hidden size gives the parameter count closest to `target`."""

    def count(hidden: int) -> int:
        lstm = sum(4 * hidden * ((emb if i == 0 else hidden) + hidden + 2) for i in range(layers))
        return vocab * emb + lstm + hidden * vocab + vocab

    hidden = min(range(8, 4096), key=lambda h: abs(count(h) - target))
    return ModelArgs(cell="lstm", vocab_size=vocab, embedding_size=emb, hidden_size=hidden,
                     num_layers=layers, dropout=dropout)  # fmt: skip


@torch.no_grad()
def flat_response_loss(
    model: RNNLanguageModel, dialogues: Sequence[EncodedDialogue], batch: int
) -> tuple[float, int]:
    """(mean NLL per response token, response tokens): turns 2+ with their <eos>, each dialogue read as one
    stream from a zero state."""
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    for idx in length_batches(dialogues, batch):
        fb = flat_batch([dialogues[i] for i in idx])
        logits, _ = model(fb.inputs)  # (batch, seq, vocab), from a zero state per dialogue
        nll += F.cross_entropy(logits[fb.response], fb.targets[fb.response], reduction="sum").item()
        tokens += int(fb.response.sum())
    model.train(was_training)
    return nll / max(tokens, 1), tokens


@dataclass
class Contender:
    """One model under training: its step, its evaluation, and its record."""

    name: str
    model: nn.Module
    step_loss: Callable[[list[int]], tuple[Tensor, int]]  # batch indices -> (mean loss, tokens)
    evaluate: Callable[[Sequence[EncodedDialogue]], tuple[float, int]]  # -> (mean response NLL, tokens)
    batch_order: Callable[[random.Random], list[list[int]]]
    clip: float
    lr: float
    seconds: float = 0.0  # training time so far (evaluations excluded)
    steps: int = 0
    tokens: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)
    pending: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.lr)

    def train_for(self, seconds: float, rng: random.Random) -> None:
        """Train for about `seconds` (whole steps; the time counted is the steps' own)."""
        self.model.train()
        end = self.seconds + seconds
        while self.seconds < end:
            if not self.pending:
                self.pending = self.batch_order(rng)
            batch = self.pending.pop()
            start = time.perf_counter()
            loss, tokens = self.step_loss(batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
            self.seconds += time.perf_counter() - start
            self.steps += 1
            self.tokens += tokens

    def scored(self, dialogues: Sequence[EncodedDialogue]) -> float:
        """Mean response NLL, checking that exactly the response tokens were scored (both models alike)."""
        nll, tokens = self.evaluate(dialogues)
        expected = response_token_count(dialogues)
        if tokens != expected:
            raise AssertionError(f"{self.name} scored {tokens} tokens, not the {expected} response tokens")
        return nll

    def record(self, valid: Sequence[EncodedDialogue]) -> dict[str, float]:
        nll = self.scored(valid)
        row = {"seconds": self.seconds, "steps": self.steps, "tokens": self.tokens,
               "val_response_loss": nll, "val_response_ppl": math.exp(nll)}  # fmt: skip
        self.curve.append(row)
        print(f"{self.name}: {self.seconds:7.1f} s, {self.steps} steps, val response ppl {math.exp(nll):.3f}",
              flush=True)  # fmt: skip
        return row


def build_contenders(data: DialogueData, a: argparse.Namespace) -> tuple[Contender, Contender]:
    tok = data.tokenizer
    vocab, eos = tok.get_vocab_size(), tok.token_to_id("<eos>")
    if eos is None:
        raise ValueError("the dialogue tokenizer has no <eos> (the end of turn)")
    torch.manual_seed(a.seed)
    hred_args = DialogueArgs(
        cell="lstm", vocab_size=vocab, embedding_size=a.emb, encoder_hidden=a.enc_hidden,
        context_hidden=a.ctx_hidden, decoder_hidden=a.dec_hidden, num_layers=a.layers, dropout=a.dropout,
        eos_id=eos,
    )  # fmt: skip
    hred = DialogueModel(hred_args)
    torch.manual_seed(a.seed)
    flat = RNNLanguageModel(flat_args_matching(parameters(hred), vocab, a.emb, a.layers, a.dropout))
    train = data.train

    def hred_loss(idx: list[int]) -> tuple[Tensor, int]:
        loss = hred.loss(dialogue_batch([train[i] for i in idx]))
        return loss.objective, loss.tokens

    def flat_loss(idx: list[int]) -> tuple[Tensor, int]:
        fb = flat_batch([train[i] for i in idx])
        logits, _ = flat(fb.inputs)  # (batch, seq, vocab) from a zero state: one stream per dialogue
        return F.cross_entropy(logits[fb.mask], fb.targets[fb.mask]), int(fb.mask.sum())

    device = torch.device("cpu")

    def hred_response_loss(dialogues: Sequence[EncodedDialogue]) -> tuple[float, int]:
        nll, _, tokens = response_loss(hred, dialogues, a.batch_size, device)
        return nll, tokens

    return (
        Contender("HRED", hred, hred_loss,
                  lambda d: hred_response_loss(d),
                  lambda rng: length_batches(train, a.batch_size, rng, by_longest_turn=True), a.clip, a.lr),
        Contender("flat LSTM", flat, flat_loss, lambda d: flat_response_loss(flat, d, a.batch_size),
                  lambda rng: length_batches(train, a.batch_size, rng), a.clip, a.lr),
    )  # fmt: skip


def run(a: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(a.threads)
    dialogues = read_dialogues(a.data, "auto", a.turns_per_dialogue)
    if a.quick:
        dialogues = dialogues[:80]
    data = prepare_dialogue_data(dialogues, seed=a.split_seed)
    print(data.describe(), flush=True)
    contenders = build_contenders(data, a)
    for c in contenders:
        print(f"{c.name}: {parameters(c.model):,} parameters", flush=True)
        c.record(data.valid)
    rngs = {c.name: random.Random(a.seed) for c in contenders}
    budget, next_eval = a.minutes * 60, {c.name: a.eval_seconds for c in contenders}
    started = time.time()
    while any(c.seconds < budget for c in contenders):
        for c in contenders:
            if c.seconds >= budget:
                continue
            c.train_for(min(a.slice_seconds, budget - c.seconds), rngs[c.name])
            if c.seconds >= next_eval[c.name] or c.seconds >= budget:
                c.record(data.valid)
                next_eval[c.name] = c.seconds + a.eval_seconds
    final = {c.name: final_scores(c, data) for c in contenders}
    return report(a, data, contenders, final, time.time() - started)


def final_scores(c: Contender, data: DialogueData) -> dict[str, float]:
    valid, test = c.curve[-1]["val_response_loss"], c.scored(data.test)
    return {"val_response_ppl": math.exp(valid), "test_response_ppl": math.exp(test),
            "val_response_loss": valid, "test_response_loss": test}  # fmt: skip


def report(
    a: argparse.Namespace, data: DialogueData, contenders: Sequence[Contender],
    final: dict[str, dict[str, float]], wall: float,
) -> dict[str, Any]:  # fmt: skip
    hred, flat = contenders
    ratio = final[hred.name]["val_response_ppl"] / final[flat.name]["val_response_ppl"]
    models = {
        c.name: {"parameters": parameters(c.model), "args": asdict(c.model.args),  # type: ignore[call-overload]
                 "steps": c.steps, "train_seconds": c.seconds, "tokens_seen": c.tokens,
                 "tokens_per_second": c.tokens / max(c.seconds, 1e-9), **final[c.name], "curve": c.curve}
        for c in contenders
    }  # fmt: skip
    return {
        "benchmark": "dialogue_quality",
        "command": a.command,
        "data": {
            "source": str(a.data),
            "split": data.splits.describe(),
            "vocabulary": data.tokenizer.get_vocab_size(),
            "valid_response_tokens": response_token_count(data.valid),
            "test_response_tokens": response_token_count(data.test),
        },
        "budget": {
            "kind": "equal training wall-clock per model, evaluations excluded, interleaved slices",
            "minutes_per_model": a.minutes,
            "slice_seconds": a.slice_seconds,
            "threads": a.threads,
            "batch_size_dialogues": a.batch_size,
            "lr": a.lr,
            "seed": a.seed,
        },
        "models": models,
        "hred_over_flat_val_ppl": ratio,
        "parameter_ratio": models[hred.name]["parameters"] / models[flat.name]["parameters"],
        "wall_seconds": wall,
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
    }


def ppl_at_steps(curve: list[dict[str, float]], steps: float) -> float | None:
    """The validation response perplexity of a curve at `steps`, interpolated (in log space) between its
    evaluations; None beyond its last one."""
    for before, after in itertools.pairwise(curve):
        if before["steps"] <= steps <= after["steps"]:
            span = max(after["steps"] - before["steps"], 1e-9)
            w = (steps - before["steps"]) / span
            return math.exp((1 - w) * before["val_response_loss"] + w * after["val_response_loss"])
    return None


def equal_steps_line(result: dict[str, Any]) -> str:
    """The comparison at HRED's step count (the same dialogues seen), from the flat model's curve."""
    hred, flat = result["models"]["HRED"], result["models"]["flat LSTM"]
    at = ppl_at_steps(flat["curve"], hred["steps"])
    if at is None:
        return ""
    return (
        f"At equal steps instead (the same {hred['steps']} batches of dialogues seen; the flat model's curve "
        f"interpolated between its evaluations): flat {at:.3f} vs HRED {hred['val_response_ppl']:.3f} "
        f"(ratio {hred['val_response_ppl'] / at:.3f})."
    )


def results_table(result: dict[str, Any]) -> list[str]:
    rows = [
        "| model | parameters | steps | tokens seen | tokens/s | valid response ppl | test response ppl |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["models"].items():
        ppl = f"{r['val_response_ppl']:.3f} | {r['test_response_ppl']:.3f}"
        rows.append(f"| {name} | {r['parameters']:,} | {r['steps']:,} | {r['tokens_seen']:,} | "
                    f"{r['tokens_per_second']:.0f} | {ppl} |")  # fmt: skip
    return rows


def sizes_line(result: dict[str, Any]) -> str:
    """The two models' sizes, and where HRED's parameters sit (by part)."""
    h, f = result["models"]["HRED"]["args"], result["models"]["flat LSTM"]["args"]
    model = DialogueModel(DialogueArgs(**h))
    parts = ", ".join(f"{name} {parameters(m):,}" for name, m in model.named_children() if parameters(m))
    return (
        f"Sizes ({h['cell']}, {h['num_layers']} layer(s) per stack): HRED embedding {h['embedding_size']}, "
        f"encoder {h['encoder_hidden']}, context {h['context_hidden']}, decoder {h['decoder_hidden']} "
        f"(parameters: {parts}); flat LSTM embedding {f['embedding_size']}, hidden {f['hidden_size']}."
    )


def comparison_lines(result: dict[str, Any]) -> list[str]:
    ratio = result["hred_over_flat_val_ppl"]
    verdict = (f"HRED's validation response perplexity is {abs(1 - ratio):.1%} "
               f"{'lower' if ratio < 1 else 'higher'} than the flat LSTM's")  # fmt: skip
    return [f"**{verdict}** (ratio {ratio:.3f}), at equal training time.", "", equal_steps_line(result)]


def previous_section(result: dict[str, Any]) -> list[str]:
    """The configuration this run replaced (`--previous`), kept so the record stays whole."""
    prev = result.get("previous")
    if prev is None:
        return []
    encoder = prev["budget"].get("hred_encoder")
    return [
        "## Previous configuration",
        "",
        f"Command: `{prev['command']}` ({prev['budget']['minutes_per_model']} min per model"
        + (f"; HRED's encoder: {encoder}, a bench option then, the model's own way now" if encoder else "")
        + ").",
        "",
        sizes_line(prev),
        "",
        *results_table(prev),
        "",
        *comparison_lines(prev),
        "",
    ]


def write_markdown(result: dict[str, Any], path: Path) -> None:
    b, d = result["budget"], result["data"]
    text = [
        "# Dialogue quality: HRED vs a flat LSTM LM at equal parameters",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Data: {d['source']} ({d['split']}; {d['vocabulary']} chars; {d['valid_response_tokens']:,} "
        f"validation and {d['test_response_tokens']:,} test response tokens). Metric: per-token perplexity "
        "of the held-out responses (turns 2+ of each dialogue, each turn's `<eos>` included), every token "
        "predicted from the whole history; the same target positions for both models.",
        "",
        f"Budget: {b['kind']}: {b['minutes_per_model']} min per model, {b['threads']} CPU threads, "
        f"{b['batch_size_dialogues']} dialogues per step, Adam lr {b['lr']}, seed {b['seed']}. "
        f"Parameter ratio HRED/flat: {result['parameter_ratio']:.3f}.",
        "",
        sizes_line(result),
        "",
        *results_table(result),
        "",
        *comparison_lines(result),
        "",
        "Per token HRED runs two recurrent passes (the "
        "utterance encoder and the decoder, whose input also carries the context) and the turn-batched "
        "decoder computes every padded position of a batch's turns, so it sees fewer tokens per second.",
        "",
        *previous_section(result),
    ]
    path.write_text("\n".join(text), encoding="utf-8")


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for name, r in result["models"].items():
        curve = r["curve"][1:]  # the untrained point would flatten the plot
        ppl = [p["val_response_ppl"] for p in curve]
        label = f"{name} ({r['parameters']:,} params)"
        axes[0].plot([p["seconds"] / 60 for p in curve], ppl, marker="o", label=label)
        axes[1].plot([p["steps"] for p in curve], ppl, marker="o", label=label)
    prev = result.get("previous", {}).get("models", {}).get("HRED")
    if prev is not None:
        a = prev["args"]
        label = f"HRED, previous {a['encoder_hidden']}/{a['context_hidden']}/{a['decoder_hidden']}"
        curve = prev["curve"][1:]
        ppl = [p["val_response_ppl"] for p in curve]
        axes[0].plot([p["seconds"] / 60 for p in curve], ppl, ls="--", color="grey", label=label)
        axes[1].plot([p["steps"] for p in curve], ppl, ls="--", color="grey", label=label)
    axes[0].set_xlabel("training time per model (min, evaluations excluded)")
    axes[1].set_xlabel("optimiser steps (batches of dialogues)")
    axes[0].set_ylabel("validation response perplexity (per char)")
    fig.suptitle("Tiny Shakespeare dialogues: held-out response perplexity, equal parameters")
    for ax in axes:
        ax.set_yscale("log")  # the first minutes' perplexities would flatten the rest
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHAKESPEARE, help="a dialogue file (dialogue_data formats)")
    p.add_argument("--minutes", type=float, default=18.0, help="training time per model")
    p.add_argument("--slice-seconds", type=float, default=30.0, help="turn length of the interleaving")
    p.add_argument("--eval-seconds", type=float, default=120.0, help="evaluate every this much training")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="dialogues per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--emb", type=int, default=48)
    p.add_argument("--enc-hidden", type=int, default=48)
    p.add_argument("--ctx-hidden", type=int, default=64)
    p.add_argument("--dec-hidden", type=int, default=212)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--turns-per-dialogue", type=int, default=8)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: 80 dialogues, tiny budget")
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    p.add_argument("--from-json", type=Path, help="only rewrite the .md and .png of this result")
    p.add_argument("--previous", type=Path, help="an earlier result JSON, kept in this one and its table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import sys

    a = parse_args(argv)
    a.command = "python bench/dialogue_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.quick:
        a.minutes, a.slice_seconds, a.eval_seconds = 0.1, 2.0, 3.0
        a.enc_hidden = a.ctx_hidden = a.dec_hidden = 32
    a.out.mkdir(parents=True, exist_ok=True)
    # --from-json: redraw the table and the plot of a finished run
    result = run(a) if a.from_json is None else json.loads(a.from_json.read_text(encoding="utf-8"))
    if a.previous is not None:
        result["previous"] = {k: v for k, v in json.loads(a.previous.read_text(encoding="utf-8")).items()
                              if k != "previous"}  # fmt: skip
    if a.from_json is None or a.previous is not None:
        (a.out / "dialogue_quality.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    write_markdown(result, a.out / "dialogue_quality.md")
    write_plot(result, a.out / "dialogue_quality.png")
    print((a.out / "dialogue_quality.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
