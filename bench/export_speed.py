"""One step of an exported language model: ONNX Runtime (fp32, int8, fp16; step and last-position graphs)
against PyTorch eager, side by side in one run, and against the memory-bandwidth floor.

    python bench/export_speed.py                       # design + demo sizes, batch 1/8/32/128, 2 threads
    python bench/export_speed.py --threads 1 --out docs/bench/export_speed_t1   # the server's setting here
    python bench/export_speed.py --quick               # a smoke run (demo size, few repeats)

Models have random weights (speed does not depend on their values): "design" is DESIGN.md's LSTM LM
(vocab 10k, emb 256, hidden 512, 2 layers), "demo" the size `rnnserve demo` trains (char vocab ~100,
emb 128, hidden 256, 2 layers). The graphs are made the way `rnnserve export` makes a bundle's
(`rnnserve.export.variants`: exported, BASIC-optimised offline, then quantised/converted) and run with
the session options the server uses (ORT_ENABLE_ALL; EXTENDED for fp16).

Tables: (1) one step (seq 1) per batch size; (2) the memory-bandwidth floor at batch 1: bytes of weights
a step reads (every initializer but the embedding table, of which it reads one row per token) divided by
the best read bandwidth measured now over a buffer of the same size (and, for context, over one that
fits in cache and one far bigger than the L3); (3) prefill of a prompt: the step graph (logits for every
position), the same graph with an extra `logits_last` output fetched alone, and the separate
last-position graph; (4) session creation and step time of the plain, BASIC-saved and ALL-saved graphs.
Writes `<out>.json` and `<out>.png` (default docs/bench/export_speed).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from rnnserve.export.manifest import TensorSpec
from rnnserve.export.onnx_export import export_lm_to_onnx, io_specs, onnx_export_quietly
from rnnserve.export.optimize import LEVELS, optimize_offline
from rnnserve.export.quantize import convert_precision, session_options
from rnnserve.export.variants import LAST_OUTPUT, export_lm_last_to_onnx
from rnnserve.training.model import ModelArgs, RNNLanguageModel

SIZES = {
    "design": ModelArgs(
        "lstm", vocab_size=10_000, embedding_size=256, hidden_size=512, num_layers=2, dropout=0.0
    ),
    "demo": ModelArgs("lstm", vocab_size=100, embedding_size=128, hidden_size=256, num_layers=2, dropout=0.0),
}
STEP_ENGINES = ("torch", "fp32", "fp32_last", "int8", "int8_last", "fp16")
Feeds = dict[str, np.ndarray]


# -- graphs ---------------------------------------------------------------------------------------------


class _BothOutputs(nn.Module):
    """The step graph with an extra `logits_last` output: does ORT skip the full projection if only that
    output is fetched? (It does not: see table 3.)"""

    def __init__(self, model: RNNLanguageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        y, (h2, c2) = m.rnn(m.embedding(tokens), (h, c))  # y (batch, seq, hidden)
        return m.decoder(y), m.decoder(y[:, -1]), h2, c2  # (batch, seq, vocab), (batch, vocab)


def build_graphs(model: RNNLanguageModel, d: Path) -> dict[str, Path]:
    """Every graph the tables use, made as `rnnserve export` makes a bundle's."""
    g = {"plain": export_lm_to_onnx(model, d / "plain.onnx")}
    g["plain_last"] = export_lm_last_to_onnx(model, d / "plain_last.onnx")
    ins, outs = io_specs(model)
    last = TensorSpec(LAST_OUTPUT, ["batch", model.args.vocab_size], "float32")
    example = (torch.zeros(2, 3, dtype=torch.long), *model.init_state(2, "cpu"))
    g["both"] = onnx_export_quietly(
        _BothOutputs(model), example, d / "both.onnx", ins, [outs[0], last, *outs[1:]]
    )
    g["fp32"] = optimize_offline(g["plain"], d / "fp32.onnx")
    g["fp32_last"] = optimize_offline(g["plain_last"], d / "fp32_last.onnx")
    g["all"] = optimize_offline(g["plain"], d / "all.onnx", level="all")  # provider-specific: table 4 only
    for precision in ("int8", "fp16"):
        for suffix in ("", "_last"):
            dst = d / f"{precision}{suffix}.onnx"
            convert_precision(g[f"fp32{suffix}"], dst, precision)
            g[f"{precision}{suffix}"] = dst
    return g


def session(path: Path, threads: int, precision: str = "fp32") -> ort.InferenceSession:
    so = session_options(precision)  # what the server uses: ENABLE_ALL (EXTENDED for fp16)
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def weight_bytes(path: Path, batch: int = 1) -> int:
    """Bytes of initializers a step reads: all but the embedding table, plus one table row per token."""
    graph = onnx.load(str(path)).graph
    sizes = {i.name: int(np.prod(i.dims)) * onnx.helper.tensor_dtype_to_np_dtype(i.data_type).itemsize
             for i in graph.initializer}  # fmt: skip
    table = next(n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in sizes)
    dims = next(i.dims for i in graph.initializer if i.name == table)  # (vocab, emb)
    return sum(sizes.values()) - sizes[table] + batch * sizes[table] // int(dims[0])


# -- timing ---------------------------------------------------------------------------------------------


def _inner_calls(fn: Callable[[], object], min_time_s: float) -> int:
    """How many calls of `fn` last about `min_time_s` (after one warm-up call)."""
    fn()
    t0 = time.perf_counter()
    fn()
    return max(1, int(min_time_s / max(time.perf_counter() - t0, 1e-6)))


def side_by_side_ms(
    calls: dict[str, Callable[[], object]], repeats: int, min_time_s: float = 0.01
) -> dict[str, float]:
    """ms per call of each function, timed in interleaved rounds; each figure is the best of `repeats`
    samples (a sample averages calls lasting ~`min_time_s`). The machine is shared: other jobs only ever
    add time, so the best interleaved sample is the steadiest estimate of what each engine costs, and
    the engines see the same machine."""
    inner = {k: _inner_calls(f, min_time_s) for k, f in calls.items()}
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, f in calls.items():
            t0 = time.perf_counter()
            for _ in range(inner[k]):
                f()
            samples[k].append((time.perf_counter() - t0) / inner[k] * 1e3)
    return {k: min(v) for k, v in samples.items()}


def feeds_for(args: ModelArgs, batch: int, seq: int, rng: np.random.Generator) -> Feeds:
    shape = (args.num_layers, batch, args.hidden_size)  # (layers, batch, hidden)
    return {
        "tokens": rng.integers(0, args.vocab_size, (batch, seq), dtype=np.int64),
        "state_in.h": rng.uniform(-1, 1, shape).astype(np.float32),
        "state_in.c": rng.uniform(-1, 1, shape).astype(np.float32),
    }


def torch_step(model: RNNLanguageModel, feeds: Feeds) -> Callable[[], object]:
    tokens = torch.from_numpy(feeds["tokens"])
    state = (torch.from_numpy(feeds["state_in.h"]), torch.from_numpy(feeds["state_in.c"]))

    def run() -> object:
        with torch.inference_mode():
            return model(tokens, state)

    return run


def ort_step(
    sess: ort.InferenceSession, feeds: Feeds, fetch: list[str] | None = None
) -> Callable[[], object]:
    return lambda: sess.run(fetch, feeds)


# -- bandwidth ------------------------------------------------------------------------------------------


def read_bandwidth(nbytes: int, threads: int, repeats: int) -> dict[str, float]:
    """GB/s reading a float32 buffer of `nbytes` again and again, by three kernels; "best" is the max."""
    a = np.random.default_rng(0).random(max(nbytes // 4, 1024), dtype=np.float32)
    matrix, ones = a[: a.size // 1024 * 1024].reshape(-1, 1024), np.ones(1024, np.float32)
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        kernels: dict[str, Callable[[], object]] = {
            "numpy dot (1 thread)": lambda: np.dot(a, a),
            f"numpy sum ({threads} threads)": lambda: list(pool.map(np.sum, parts)),
            "BLAS gemv": lambda: matrix @ ones,
        }
        out = {k: a.nbytes / (ms * 1e-3) / 1e9 for k, ms in side_by_side_ms(kernels, repeats).items()}
    out["best"] = max(out.values())
    return out


# -- tables ---------------------------------------------------------------------------------------------


def step_table(size: str, model: RNNLanguageModel, g: dict[str, Path], batches: list[int], threads: int,
               repeats: int) -> list[dict[str, Any]]:  # fmt: skip
    precision = {"fp32": "fp32", "fp32_last": "fp32", "int8": "int8", "int8_last": "int8", "fp16": "fp16"}
    sessions = {k: session(g[k], threads, p) for k, p in precision.items()}
    rng, rows = np.random.default_rng(0), []
    for batch in batches:
        feeds = feeds_for(model.args, batch, 1, rng)
        calls = {"torch": torch_step(model, feeds), **{k: ort_step(s, feeds) for k, s in sessions.items()}}
        ms = side_by_side_ms(calls, repeats)
        rows.append({"size": size, "batch": batch, **{f"{k}_ms": v for k, v in ms.items()}})
        print(f"  {size} batch {batch}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()), flush=True)
    return rows


def floor_table(size: str, g: dict[str, Path], steps: list[dict[str, Any]], threads: int,
                repeats: int) -> list[dict[str, Any]]:  # fmt: skip
    batch1 = next(r for r in steps if r["size"] == size and r["batch"] == 1)
    rows = []
    for variant in ("fp32", "int8"):
        nbytes = weight_bytes(g[variant])
        bw = {
            "same size": read_bandwidth(nbytes, threads, repeats),
            "in cache (4 MB)": read_bandwidth(4 << 20, threads, repeats),
            "DRAM (256 MB)": read_bandwidth(256 << 20, threads, repeats),
        }
        floor_ms = nbytes / (bw["same size"]["best"] * 1e9) * 1e3
        rows.append({"size": size, "variant": variant, "weight_mb": nbytes / 1e6, "bandwidth_gbs": bw,
                     "floor_ms": floor_ms, "ort_ms": batch1[f"{variant}_ms"],
                     "ort_over_floor": batch1[f"{variant}_ms"] / floor_ms})  # fmt: skip
    return rows


def prefill_table(size: str, model: RNNLanguageModel, g: dict[str, Path], prompts: list[tuple[int, int]],
                  threads: int, repeats: int) -> list[dict[str, Any]]:  # fmt: skip
    s = {k: session(g[k], threads, "int8" if k.startswith("int8") else "fp32")
         for k in ("fp32", "both", "fp32_last", "int8", "int8_last")}  # fmt: skip
    state_out = ["state_out.h", "state_out.c"]
    rng, rows = np.random.default_rng(1), []
    for batch, seq in prompts:
        feeds = feeds_for(model.args, batch, seq, rng)
        calls = {
            "torch": torch_step(model, feeds),
            "fp32_step": ort_step(s["fp32"], feeds),
            "fp32_both_fetch_last": ort_step(s["both"], feeds, [LAST_OUTPUT, *state_out]),
            "fp32_last": ort_step(s["fp32_last"], feeds),
            "int8_step": ort_step(s["int8"], feeds),
            "int8_last": ort_step(s["int8_last"], feeds),
        }
        ms = side_by_side_ms(calls, max(3, repeats // 2))
        rows.append({"size": size, "batch": batch, "seq": seq, **{f"{k}_ms": v for k, v in ms.items()}})
        print(
            f"  {size} prefill {batch}x{seq}: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()), flush=True
        )
    return rows


def load_table(size: str, model: RNNLanguageModel, g: dict[str, Path], threads: int,
               repeats: int) -> list[dict[str, Any]]:  # fmt: skip
    feeds = feeds_for(model.args, 1, 1, np.random.default_rng(2))
    graphs = {"as exported": "plain", "BASIC, saved (bundle)": "fp32", "ALL, saved": "all"}
    no_opt = ort.SessionOptions()
    no_opt.graph_optimization_level = LEVELS["disabled"]
    no_opt.intra_op_num_threads = threads
    cpu = ["CPUExecutionProvider"]
    creates: dict[str, Callable[[], object]] = {}
    for name, key in graphs.items():
        creates[f"{name}|server"] = partial(session, g[key], threads)
        creates[f"{name}|none"] = partial(ort.InferenceSession, str(g[key]), no_opt, providers=cpu)
    load_ms = side_by_side_ms(creates, max(3, repeats // 3), min_time_s=0.0)
    steps = side_by_side_ms({name: ort_step(session(g[key], threads), feeds) for name, key in graphs.items()},
                            repeats)  # fmt: skip
    return [{"size": size, "graph": name, "nodes": len(onnx.load(str(g[key])).graph.node),
             "load_ms": load_ms[f"{name}|server"], "load_no_opt_ms": load_ms[f"{name}|none"],
             "step_ms": steps[name]} for name, key in graphs.items()]  # fmt: skip


# -- output ---------------------------------------------------------------------------------------------


def _row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |")


def _header(*cells: str) -> None:
    _row(*cells)
    _row(*["---"] * len(cells))


def print_tables(result: dict[str, Any]) -> None:
    t = result["threads"]
    print(f"\n### One step (seq 1), ms: {t} thread(s), ORT {ort.__version__}, torch {torch.__version__}\n")
    _header("size", "batch", "PyTorch eager", "ORT fp32", "ORT fp32 last", "ORT int8", "ORT int8 last",
            "ORT fp16 (CPU)", "ORT fp32 vs eager", "int8 vs fp32", "fp32 tokens/s")  # fmt: skip
    for r in result["step"]:
        ms = [f"{r[f'{k}_ms']:.3f}" for k in STEP_ENGINES]
        _row(r["size"], r["batch"], *ms, f"{r['torch_ms'] / r['fp32_ms']:.2f}x",
             f"{r['fp32_ms'] / r['int8_ms']:.2f}x", f"{r['batch'] / r['fp32_ms'] * 1e3:,.0f}")  # fmt: skip
    print("\n### Batch 1 against the memory-bandwidth floor (weights read per step / read bandwidth now)\n")
    _header("size", "graph", "weights read/step", "bandwidth, same-size buffer", "in cache (4 MB)",
            "DRAM (256 MB)", "floor", "ORT", "ORT / floor")  # fmt: skip
    for r in result["floor"]:
        bw = {k: f"{v['best']:.0f} GB/s" for k, v in r["bandwidth_gbs"].items()}
        _row(r["size"], r["variant"], f"{r['weight_mb']:.1f} MB", bw["same size"], bw["in cache (4 MB)"],
             bw["DRAM (256 MB)"], f"{r['floor_ms']:.3f} ms", f"{r['ort_ms']:.3f} ms",
             f"{r['ort_over_floor']:.2f}")  # fmt: skip
    print("\n### Prefill (one run over the whole prompt), ms\n")
    _header("size", "batch x prompt", "PyTorch eager", "ORT step graph",
            "same graph + `logits_last`, fetched alone", "ORT last graph", "int8 step",
            "int8 last")  # fmt: skip
    for r in result["prefill"]:
        keys = ("torch", "fp32_step", "fp32_both_fetch_last", "fp32_last", "int8_step", "int8_last")
        _row(r["size"], f"{r['batch']}x{r['seq']}", *(f"{r[f'{k}_ms']:.2f}" for k in keys))
    print("\n### Offline optimisation: session creation (server options) and batch-1 step\n")
    _header("size", "graph", "nodes", "create session, ms", "create without optimisation, ms", "step, ms")
    for r in result["load"]:
        _row(r["size"], r["graph"], r["nodes"], f"{r['load_ms']:.1f}", f"{r['load_no_opt_ms']:.1f}",
             f"{r['step_ms']:.3f}")  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size"] for r in result["step"]}, key=list(SIZES).index)
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    labels = {"torch": "PyTorch eager", "fp32": "ORT fp32", "fp32_last": "ORT fp32 last-position",
              "int8": "ORT int8", "int8_last": "ORT int8 last-position",
              "fp16": "ORT fp16 (CPU)"}  # fmt: skip
    for ax, size in zip(axes[0], sizes, strict=True):
        rows = [r for r in result["step"] if r["size"] == size]
        batches = [r["batch"] for r in rows]
        for k, label in labels.items():
            ax.plot(batches, [r[f"{k}_ms"] for r in rows], marker="o", label=label)
        for f in (r for r in result["floor"] if r["size"] == size):
            color = "black" if f["variant"] == "fp32" else "gray"
            ax.scatter([1], [f["floor_ms"]], marker="_", s=400, color=color, zorder=5,
                       label=f"bandwidth floor ({f['variant']}, batch 1)")  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="batch (sessions stepped together)", ylabel="ms per step",
               title=f"{size} LSTM LM, one step, {result['threads']} thread(s)")  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="design,demo", help=f"comma-separated, of {list(SIZES)}")
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ORT and torch threads")
    p.add_argument("--repeats", type=int, default=15, help="samples per timing (median)")
    p.add_argument("--prompt", type=int, default=256, help="prompt length for the prefill table")
    p.add_argument("--out", default="docs/bench/export_speed", help="writes OUT.json and OUT.png")
    p.add_argument("--quick", action="store_true", help="demo size, batch 1/8, 3 repeats (a smoke run)")
    a = p.parse_args()
    if a.quick:
        a.sizes, a.batches, a.repeats, a.prompt = "demo", "1,8", 3, 32
    torch.set_num_threads(a.threads)
    batches = [int(b) for b in a.batches.split(",")]
    result: dict[str, Any] = {"threads": a.threads, "onnxruntime": ort.__version__,
                              "torch": torch.__version__, "step": [], "floor": [], "prefill": [],
                              "load": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes.split(","):
            torch.manual_seed(0)
            model = RNNLanguageModel(SIZES[size]).eval()
            (Path(tmp) / size).mkdir()
            print(f"[{size}] exporting and converting graphs", flush=True)
            g = build_graphs(model, Path(tmp) / size)
            result["step"] += step_table(size, model, g, batches, a.threads, a.repeats)
            result["floor"] += floor_table(size, g, result["step"], a.threads, a.repeats)
            result["prefill"] += prefill_table(size, model, g, [(1, a.prompt), (8, a.prompt // 4)], a.threads,
                                               a.repeats)  # fmt: skip
            result["load"] += load_table(size, model, g, a.threads, a.repeats)
    print_tables(result)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
