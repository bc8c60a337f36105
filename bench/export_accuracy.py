"""What int8 and fp16 bundles cost in accuracy, and what they buy in speed, for a trained checkpoint.

    python bench/export_accuracy.py runs/ts/checkpoint.pt --data ../shared/data/tiny-shakespeare/input.txt
    python bench/export_accuracy.py runs/sst2/checkpoint.pt --dev ../shared/data/sst-2/dev.tsv

Exports the checkpoint at each precision (`rnnserve export --precision`, into a temporary repository),
then evaluates every bundle on ONNX Runtime CPU with the server's session options, beside PyTorch fp32:
- a language model: mean next-token loss (nats) on the validation text, the last `--val-fraction` of the
  characters of `--data` (Tiny Shakespeare's usual 90/10 cut), laid out as `--eval-batch` parallel
  streams read in windows of `--bptt` tokens with the state carried (as training evaluates);
- a classifier: accuracy on the labelled `--dev` file (a whole-text graph gets padded batches with
  lengths; a streaming graph gets batches of equal-length texts from its initial state).
And the step time at batch 1 and 32 (one token for a language model; a 20-token chunk for a classifier),
each precision beside fp32 in the same run. Prints a table; `--json` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchutil import log_softmax, median_ms

from rnnserve.export.manifest import read_manifest
from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.server.runtime import OnnxModel, RuntimeOptions
from rnnserve.training.train import read_checkpoint_kind

Runner = Callable[[np.ndarray, dict[str, np.ndarray]], tuple[np.ndarray, dict[str, np.ndarray]]]


# -- language models ------------------------------------------------------------------------------------


def lm_validation_ids(tok: Any, data: Path, val_fraction: float) -> list[int]:
    """Token ids of the last `val_fraction` of the characters of `data` (cut at int(n * (1 - f)))."""
    text = data.read_text(encoding="utf-8")
    return list(tok.encode(text[int(len(text) * (1 - val_fraction)) :], add_special_tokens=False).ids)


def lm_loss(run: Runner, state: dict[str, np.ndarray], ids: list[int], batch: int, bptt: int) -> float:
    """Mean next-token loss of `run` over `ids` as `batch` streams, windows of `bptt`, state carried."""
    n = len(ids) // batch
    data = np.array(ids[: n * batch], dtype=np.int64).reshape(batch, n)  # (batch, time)
    total, count = 0.0, 0
    for i in range(0, n - 1, bptt):
        x, y = data[:, i : min(i + bptt, n - 1)], data[:, i + 1 : i + 1 + bptt]  # (batch, <=bptt) each
        logits, state = run(x, state)  # (batch, seq, vocab)
        logp = log_softmax(logits)
        total -= float(np.take_along_axis(logp, y[:, :, None], axis=-1).sum())
        count += y.size
    return total / count


def evaluate_lm(checkpoint: Path, bundles: dict[str, Path], a: argparse.Namespace) -> list[dict[str, Any]]:
    from rnnserve.training.train import load_checkpoint

    model, tok, _ = load_checkpoint(checkpoint)
    ids = lm_validation_ids(tok, a.data, a.val_fraction)
    names = list(model.args.state_names)

    def torch_run(x: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        with torch.inference_mode():
            logits, new = model(torch.from_numpy(x), tuple(torch.from_numpy(state[n]) for n in names))
        return logits.numpy(), {n: s.numpy() for n, s in zip(names, new, strict=True)}

    zeros = {
        n: np.zeros((model.args.num_layers, a.eval_batch, model.args.hidden_size), np.float32) for n in names
    }
    rows = [{"model": "PyTorch fp32", "val_loss": lm_loss(torch_run, zeros, ids, a.eval_batch, a.bptt)}]
    print(f"  {rows[0]}", flush=True)
    runtimes = {p: OnnxModel(b, read_manifest(b), RuntimeOptions(device="cpu")) for p, b in bundles.items()}
    rng = np.random.default_rng(0)
    steps = {b: rng.integers(0, model.args.vocab_size, (b, 1), dtype=np.int64) for b in (1, 32)}
    for precision, rt in runtimes.items():
        loss = lm_loss(partial(_run_logits, rt), rt.initial_state(a.eval_batch), ids, a.eval_batch, a.bptt)
        rows.append({"model": f"ORT {precision}", "val_loss": loss})
        print(f"  {rows[-1]}", flush=True)
    _time_rows(rows, runtimes, lambda rt, b: (steps[b], rt.initial_state(b)))
    return rows


def _run_logits(
    rt: OnnxModel, x: np.ndarray, state: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    outputs, new = rt.run(x, state)
    return outputs["logits"], new  # (batch, seq, vocab), new state


# -- classifiers ----------------------------------------------------------------------------------------


def evaluate_classifier(
    checkpoint: Path, bundles: dict[str, Path], a: argparse.Namespace
) -> list[dict[str, Any]]:
    from rnnserve.training.classifier_data import load_labelled
    from rnnserve.training.classifier_train import encode_texts, load_classifier_checkpoint, predict_proba

    model, tok, ckpt = load_classifier_checkpoint(checkpoint)
    texts, gold, _ = load_labelled(a.dev, label_names=ckpt["raw_labels"])
    seqs = encode_texts(tok, texts)
    keep = [i for i, s in enumerate(seqs) if s]  # a text with no tokens cannot be classified
    texts, gold, seqs = [texts[i] for i in keep], np.array([gold[i] for i in keep]), [seqs[i] for i in keep]
    acc = float((predict_proba(model, tok, texts).argmax(-1) == gold).mean())
    rows: list[dict[str, Any]] = [{"model": "PyTorch fp32", "accuracy": acc, "examples": len(texts)}]
    runtimes = {p: OnnxModel(b, read_manifest(b), RuntimeOptions(device="cpu")) for p, b in bundles.items()}
    for precision, rt in runtimes.items():
        pred = classify(rt, seqs, pad_id=int(ckpt["special_tokens"]["pad"]))
        rows.append(
            {"model": f"ORT {precision}", "accuracy": float((pred == gold).mean()), "examples": len(texts)}
        )
    for r in rows:
        print(f"  {r}", flush=True)
    rng = np.random.default_rng(0)
    chunk = {b: rng.integers(1, model.args.vocab_size, (b, 20), dtype=np.int64) for b in (1, 32)}  # (b, 20)
    _time_rows(rows, runtimes, lambda rt, b: _classifier_inputs(rt, chunk[b]))
    return rows


def _classifier_inputs(rt: OnnxModel, tokens: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    return tokens, rt.initial_state(tokens.shape[0])


def classify(rt: OnnxModel, seqs: list[list[int]], pad_id: int, batch: int = 64) -> np.ndarray:
    """Predicted class per sequence through a classifier bundle (whole: padded; streaming: equal lengths)."""
    pred = np.zeros(len(seqs), dtype=np.int64)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    whole = rt.manifest.classifier_mode == "whole"
    groups: list[list[int]] = []
    for i in order:  # streaming graphs take no lengths: a batch holds texts of one length only
        if groups and len(groups[-1]) < batch and (whole or len(seqs[groups[-1][0]]) == len(seqs[i])):
            groups[-1].append(i)
        else:
            groups.append([i])
    for idx in groups:
        width = max(len(seqs[i]) for i in idx)
        tokens = np.full((len(idx), width), pad_id, dtype=np.int64)  # (batch, width), right-padded
        for row, i in enumerate(idx):
            tokens[row, : len(seqs[i])] = seqs[i]
        lengths = np.array([len(seqs[i]) for i in idx], dtype=np.int64) if whole else None
        outputs, _ = rt.run(tokens, rt.initial_state(len(idx)), lengths)
        pred[idx] = outputs["probs"].argmax(-1)
    return pred


# -- both -----------------------------------------------------------------------------------------------


Inputs = Callable[[OnnxModel, int], tuple[np.ndarray, dict[str, np.ndarray]]]  # (runtime, batch) -> feeds


def _time_rows(rows: list[dict[str, Any]], runtimes: dict[str, OnnxModel], inputs: Inputs) -> None:
    """Step times at batch 1 and 32 per precision, interleaved so that each sees the same machine."""
    times: dict[str, dict[int, list[float]]] = {p: {1: [], 32: []} for p in runtimes}
    for _ in range(3):
        for precision, rt in runtimes.items():
            for b in (1, 32):
                tokens, state = inputs(rt, b)
                lengths = (
                    np.full(b, tokens.shape[1], np.int64) if rt.manifest.classifier_mode == "whole" else None
                )
                times[precision][b].append(median_ms(partial(rt.run, tokens, state, lengths)))
    for r in rows:
        precision = r["model"].removeprefix("ORT ")
        if precision in times:
            for b in (1, 32):
                r[f"b{b}_ms"] = min(times[precision][b])
                r[f"b{b}_vs_fp32"] = min(times["fp32"][b]) / r[f"b{b}_ms"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", type=Path, help="language model: the text whose tail is validation")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--bptt", type=int, default=128)
    p.add_argument("--dev", type=Path, help="classifier: labelled TSV/CSV to score")
    p.add_argument("--precisions", default="fp32,int8,fp16")
    p.add_argument("--json", type=Path, help="write the figures here")
    a = p.parse_args()
    kind = read_checkpoint_kind(a.checkpoint)
    if (kind == "classifier") != (a.dev is not None) or (kind == "lm") != (a.data is not None):
        p.error("a language model needs --data, a classifier --dev")
    with tempfile.TemporaryDirectory() as tmp:
        bundles = {}
        for precision in a.precisions.split(","):
            t0 = time.perf_counter()
            bundles[precision] = export_checkpoint(a.checkpoint, Path(tmp), "m", precision=precision)
            size = sum(f.stat().st_size for f in bundles[precision].glob("*.onnx")) / 1e6
            print(
                f"exported {precision} in {time.perf_counter() - t0:.1f} s ({size:.1f} MB of graphs)",
                flush=True,
            )
        rows = (evaluate_classifier if kind == "classifier" else evaluate_lm)(a.checkpoint, bundles, a)
        for r in rows:
            precision = r["model"].removeprefix("ORT ")
            if precision in bundles:
                r["graph_mb"] = (bundles[precision] / "model.onnx").stat().st_size / 1e6
    metric = "accuracy" if kind == "classifier" else "val_loss"
    base = rows[0][metric]
    print(f"\n| model | {metric} | vs PyTorch | model.onnx | step b1 | b1 vs fp32 | step b32 | b32 vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["model"], f"{r[metric]:.4f}", f"{r[metric] - base:+.4f}"]
        if "b1_ms" in r:
            cells += [f"{r['graph_mb']:.2f} MB", f"{r['b1_ms']:.3f} ms", f"{r['b1_vs_fp32']:.2f}x",
                      f"{r['b32_ms']:.3f} ms", f"{r['b32_vs_fp32']:.2f}x"]  # fmt: skip
        else:
            cells += [""] * 5
        print("| " + " | ".join(cells) + " |")
    if a.json:
        a.json.write_text(json.dumps({"checkpoint": str(a.checkpoint), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
