"""GPU check of exported bundles: fp32 and fp16 (and int8) on CUDAExecutionProvider, parity and speed.

    python bench/gpu_check_export.py                  # design-size LSTM LM, random weights, < 2 minutes
    python bench/gpu_check_export.py --size tiny      # a few seconds
    python bench/gpu_check_export.py --keep /tmp/gpucheck    # export here (torch), keep the bundles...
    python bench/gpu_check_export.py --bundles /tmp/gpucheck # ...check them where there is no torch

No data needed. It writes a random-weight checkpoint (DESIGN.md's LM: vocab ~10k, emb 256, hidden 512,
2 LSTM layers; or a tiny one), exports it with `rnnserve export`'s code at fp32, fp16 and int8, loads
each bundle the way the server does (`rnnserve.server.runtime.OnnxModel`, `--device cuda`), and prints
one row per (provider, precision, graph): max |difference| from PyTorch fp32 of the logits, of the
log-probabilities and of the new state (batch 1 and 32, one token and a 16-token chunk, from random
states), and the step time at batch 1 and 32 (numpy in, numpy out: the server's path, host<->device
copies included). It also checks, in a child process, whether ONNX Runtime can create a session for the
fp16 graph at ORT_ENABLE_ALL (on this machine's CPU provider it crashed; the server uses EXTENDED for
fp16 graphs).

With `--bundles` the reference is the fp32 bundle on ONNX Runtime CPU (which the export validated against
PyTorch within 1e-4), so the GPU machine needs only onnxruntime-gpu, numpy and this package.
Without a working CUDA (no GPU, no driver, CPU-only onnxruntime) it runs the CPU rows and says which
CUDA rows it skipped. Exit status 1 when a row is outside its bound (see BOUNDS).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
from benchutil import log_softmax, median_ms

from rnnserve.export.manifest import read_manifest
from rnnserve.server.runtime import CPU, CUDA, OnnxModel, RuntimeOptions, create_inference_session

# (tokens (batch, seq), states) -> (logits (batch, seq, vocab), new states), in fp32 on the CPU
Reference = Callable[[np.ndarray, list[np.ndarray]], tuple[np.ndarray, list[np.ndarray]]]

LAST_OUTPUT = "logits_last"  # rnnserve.export.variants.LAST_OUTPUT (that module needs torch)

SIZES = {"design": (10_000, 256, 512, 2), "tiny": (300, 16, 32, 2)}  # vocab, emb, hidden, layers
# Max |log-prob difference| from PyTorch fp32 a row may show. fp32 on CUDA may use TF32 matmuls.
BOUNDS = {"fp32": 5e-3, "fp16": 5e-2, "int8": 1e-1}
CASES = [(1, 1), (32, 1), (1, 16), (32, 16)]  # (batch, seq)


def make_checkpoint(size: str, d: Path) -> Path:
    """A random-weight LSTM LM checkpoint with a word tokenizer of about `vocab` entries beside it."""
    import torch

    from rnnserve.training.model import ModelArgs, RNNLanguageModel
    from rnnserve.training.tokenizer import build_word_tokenizer
    from rnnserve.training.train import TrainConfig, save_checkpoint

    vocab, emb, hidden, layers = SIZES[size]
    tok = build_word_tokenizer(" ".join(f"w{i}" for i in range(vocab - 2)), max_size=None)
    tok.save(str(d / "tokenizer.json"))
    torch.manual_seed(0)
    args = ModelArgs("lstm", tok.get_vocab_size(), emb, hidden, layers, dropout=0.0)
    model = RNNLanguageModel(args)
    save_checkpoint(d / "checkpoint.pt", model, TrainConfig(cell="lstm", tokenizer="word"), {})
    return d / "checkpoint.pt"


def fp16_enable_all_probe(model_file: Path, providers: list[str]) -> str:
    """Create a session for the fp16 graph at ORT_ENABLE_ALL in a child process (it may segfault)."""
    code = (
        "import onnxruntime as ort, sys; so = ort.SessionOptions(); so.log_severity_level = 3; "
        "so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL; "
        f"s = ort.InferenceSession(sys.argv[1], so, providers={providers!r}); print(s.get_providers()[0])"
    )
    done = subprocess.run([sys.executable, "-c", code, str(model_file)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    if done.returncode == 0:
        return f"loads (on {done.stdout.strip()})"
    return f"FAILS (exit {done.returncode}: {'segfault' if done.returncode == -11 else done.stderr[-200:]})"


def check_bundle(reference: Reference, runtime: OnnxModel, last: ort.InferenceSession,
                 rng: np.random.Generator) -> dict[str, float]:  # fmt: skip
    """Max abs differences from the reference (step graph, last graph) and step times at batch 1 and 32."""
    m, out = runtime.manifest, {"logits": 0.0, "logprobs": 0.0, "state": 0.0, "last_logprobs": 0.0}
    for batch, seq in CASES:
        tokens = rng.integers(0, m.vocab_size, (batch, seq), dtype=np.int64)  # (batch, seq)
        state = {s.name: rng.uniform(-1, 1, s.shape_for_batch(batch)).astype(np.float32) for s in m.state}
        want, want_state = reference(tokens, [state[s.name] for s in m.state])  # (batch, seq, vocab)
        got, got_state = runtime.run(tokens, state)
        logp = log_softmax(want)
        out["logits"] = max(out["logits"], float(np.abs(got["logits"] - want).max()))
        out["logprobs"] = max(out["logprobs"], float(np.abs(log_softmax(got["logits"]) - logp).max()))
        for s, w in zip(m.state, want_state, strict=True):
            out["state"] = max(out["state"], float(np.abs(got_state[s.name] - w).max()))
        feeds = {"tokens": tokens, **{s.input_name: state[s.name] for s in m.state}}
        (last_logits,) = last.run([LAST_OUTPUT], feeds)  # (batch, vocab)
        diff = float(np.abs(log_softmax(last_logits) - logp[:, -1]).max())
        out["last_logprobs"] = max(out["last_logprobs"], diff)
    for batch in (1, 32):
        tokens = rng.integers(0, m.vocab_size, (batch, 1), dtype=np.int64)
        state = runtime.initial_state(batch)
        out[f"b{batch}_ms"] = median_ms(partial(runtime.run, tokens, state), repeats=20)
    return out


def export_bundles(size: str, d: Path) -> dict[str, Path]:
    """Export a random-weight checkpoint at every precision into `d`/repo (needs torch)."""
    checkpoint = make_checkpoint(size, d)
    from rnnserve.export.onnx_export import export_checkpoint

    bundles = {}
    for precision in ("fp32", "fp16", "int8"):
        t0 = time.perf_counter()
        bundles[precision] = export_checkpoint(checkpoint, d / "repo", size, precision=precision)
        print(f"exported {precision} in {time.perf_counter() - t0:.1f} s (validated on CPU)", flush=True)
    return bundles


def find_bundles(repo: Path) -> dict[str, Path]:
    """The bundles an earlier `--keep` run wrote, by precision."""
    found = {read_manifest(m.parent).precision: m.parent for m in sorted(repo.glob("*/*/manifest.json"))}
    if "fp32" not in found:
        raise SystemExit(f"no fp32 bundle under {repo} (write them with --keep DIR on a machine with torch)")
    return found


def torch_reference(bundle: Path) -> Reference:
    """PyTorch fp32 on CPU, from the checkpoint the bundle was exported from (beside the repository)."""
    import torch

    from rnnserve.training.train import load_checkpoint

    model, _, _ = load_checkpoint(bundle.parent.parent.parent / "checkpoint.pt")

    def run(tokens: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        with torch.no_grad():
            logits, new = model(torch.from_numpy(tokens), tuple(torch.from_numpy(s) for s in state))
        return logits.numpy(), [s.numpy() for s in new]

    return run


def ort_reference(bundle: Path) -> Reference:
    """The fp32 bundle on ONNX Runtime CPU (validated against PyTorch within 1e-4 when exported)."""
    cpu = OnnxModel(bundle, read_manifest(bundle), RuntimeOptions(device="cpu"))

    def run(tokens: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        outputs, new = cpu.run(tokens, dict(zip((s.name for s in cpu.manifest.state), state, strict=True)))
        return outputs["logits"], [new[s.name] for s in cpu.manifest.state]

    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="design")
    p.add_argument("--keep", type=Path, help="export into this directory and keep it (for --bundles)")
    p.add_argument("--bundles", type=Path, help="check the bundles a --keep run wrote (no torch needed)")
    a = p.parse_args()
    started = time.perf_counter()
    print(f"onnxruntime {ort.__version__} (built with {ort.get_available_providers()})", flush=True)
    rows, failures, skipped = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        if a.bundles:
            bundles, what = find_bundles(a.bundles / "repo"), "the fp32 bundle on ORT CPU"
            reference = ort_reference(bundles["fp32"])
        else:
            (a.keep or Path(tmp)).mkdir(parents=True, exist_ok=True)
            bundles, what = export_bundles(a.size, a.keep or Path(tmp)), "PyTorch fp32"
            reference = torch_reference(bundles["fp32"])
        devices = ["cpu"]
        try:
            OnnxModel(bundles["fp32"], read_manifest(bundles["fp32"]), RuntimeOptions(device="cuda"))
            devices.append("cuda")
        except RuntimeError as exc:
            skipped.append(f"every CUDA row: CUDAExecutionProvider does not work here ({str(exc)[:120]})")
        if "fp16" in bundles:
            for device in devices:
                providers = [CUDA, CPU] if device == "cuda" else [CPU]
                probe = fp16_enable_all_probe(bundles["fp16"] / "model.onnx", providers)
                print(f"fp16 graph at ORT_ENABLE_ALL on {providers[0]}: {probe}", flush=True)
        rng = np.random.default_rng(0)
        for device in devices:
            for precision, bundle in bundles.items():
                manifest = read_manifest(bundle)
                runtime = OnnxModel(bundle, manifest, RuntimeOptions(device=device))
                last_file = manifest.graph_file("last")
                assert last_file is not None
                last = create_inference_session(bundle / last_file, RuntimeOptions(device=device), precision)
                figures = check_bundle(reference, runtime, last, rng)
                rows.append({"provider": runtime.provider, "precision": precision, **figures})
                if not max(figures["logprobs"], figures["last_logprobs"]) <= BOUNDS[precision]:
                    failures.append(
                        f"{runtime.provider} {precision}: log-probs off by over {BOUNDS[precision]}"
                    )
        m = read_manifest(bundles["fp32"])
    print(f"\nLSTM LM vocab {m.vocab_size}, emb {m.embedding_size}, hidden {m.hidden_size} x {m.num_layers}; "
          f"differences from {what} over (batch, seq) in {CASES}\n")  # fmt: skip
    print("| provider | precision | max abs diff logits | log-probs | log-probs, last graph | state "
          "| step b1 ms | step b32 ms | b1 vs fp32 | b32 vs fp32 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["provider"] == r["provider"] and b["precision"] == "fp32")
        print(f"| {r['provider']} | {r['precision']} | {r['logits']:.2e} | {r['logprobs']:.2e} "
              f"| {r['last_logprobs']:.2e} | {r['state']:.2e} | {r['b1_ms']:.3f} | {r['b32_ms']:.3f} "
              f"| {base['b1_ms'] / r['b1_ms']:.2f}x | {base['b32_ms'] / r['b32_ms']:.2f}x |")  # fmt: skip
    for s in skipped:
        print(f"\nSKIPPED {s}")
    for f in failures:
        print(f"FAIL {f}")
    print(f"\n{'FAIL' if failures else 'OK'} in {time.perf_counter() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
