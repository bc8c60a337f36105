"""Per-token time: the step graph + the numpy host sampler vs the K-step generation graphs (ORT, CPU).

    python bench/generate_graph.py            # table on stdout, JSON to docs/bench/generate_graph.json
    QUICK=1 python bench/generate_graph.py    # fewer repeats

(a) "host": the step graph (tokens [B,1] -> logits) then server.sampling's vectorised sampler
    (log_softmax_and_weights + sample_batch at temperature 1), one ORT run per token, as the server does;
(b) "gen K": model_gen_k<K>.onnx (export/generate_graph.py), one ORT run per K tokens, sampling inside;
(c) "plain K": model_gen_plain_k<K>.onnx, the plain variant (no top-k/top-p cut), same runs;
(d) "raw": the step graph alone, fed a fixed token, no sampling at all: the best a single-step loop does.
All at temperature 1 (the plain graph's cheapest branch; greedy takes the same branch).
Demo LM (char, emb 128, 2x256, vocab 96) and design LM (emb 256, 2x512, vocab 10k), random weights,
LSTM, fp32 and int8 (the bundle's graphs: optimised at BASIC, int8 by dynamic quantisation), 1 and 2
intra-op threads, batch 1/8/64. Each figure is the median of REPEATS timed runs of TOKENS tokens per row,
the variants interleaved run by run (host, raw, gen K..., plain K..., again) so that the load of a shared
machine falls on all of them alike; the load (`os.getloadavg`) is recorded per row.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from rnnserve.export.generate_graph import build_generate_graph, build_plain_generate_graph
from rnnserve.export.onnx_export import export_lm_to_onnx
from rnnserve.export.optimize import optimize_offline
from rnnserve.export.quantize import convert_precision
from rnnserve.server.sampling import SamplingParams, log_softmax_and_weights, sample_batch
from rnnserve.training.model import ModelArgs, RNNLanguageModel

LMS = {"demo": ModelArgs("lstm", 96, 128, 256, 2, 0.0), "design": ModelArgs("lstm", 10_000, 256, 512, 2, 0.0)}
KS = (1, 4, 8, 16)
BATCHES = (1, 8, 64)
THREADS = (1, 2)
QUICK = bool(os.environ.get("QUICK"))
REPEATS = 3 if QUICK else 9
TOKENS = 16  # tokens per row per timed run (a multiple of every K)
OUT = Path(__file__).resolve().parents[1] / "docs" / "bench" / "generate_graph.json"


def _session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


Run = Callable[[], None]


def _interleaved_medians(runs: dict[str, Run]) -> dict[str, float]:
    """ms per token step (all rows) of each run: the median of REPEATS, the runs taking turns."""
    for run in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(REPEATS):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t) / TOKENS * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _raw(sess: ort.InferenceSession, a: ModelArgs, batch: int) -> Run:
    zero = np.zeros((a.num_layers, batch, a.hidden_size), np.float32)
    tok = np.zeros((batch, 1), np.int64)

    def run() -> None:
        h, c = zero, zero
        for _ in range(TOKENS):
            _, h, c = sess.run(None, {"tokens": tok, "state_in.h": h, "state_in.c": c})

    return run


def _host(sess: ort.InferenceSession, a: ModelArgs, batch: int) -> Run:
    rng = np.random.default_rng(0)
    params = [SamplingParams(temperature=1.0)] * batch
    zero = np.zeros((a.num_layers, batch, a.hidden_size), np.float32)

    def run() -> None:
        tok, h, c = np.zeros((batch, 1), np.int64), zero, zero
        for _ in range(TOKENS):
            logits, h, c = sess.run(None, {"tokens": tok, "state_in.h": h, "state_in.c": c})
            lp, w = log_softmax_and_weights(logits[:, -1])
            tok = sample_batch(lp, params, rng.random(batch), w)[:, None]

    return run


def _gen(sess: ort.InferenceSession, a: ModelArgs, batch: int, k: int) -> Run:
    rng = np.random.default_rng(0)
    zero = np.zeros((a.num_layers, batch, a.hidden_size), np.float32)
    controls = {"temperature": np.ones(batch, np.float32), "top_k": np.zeros(batch, np.int64),
                "top_p": np.ones(batch, np.float32)}  # fmt: skip
    declared = {i.name for i in sess.get_inputs()}
    controls = {n: v for n, v in controls.items() if n in declared}  # a plain graph has no top_k/top_p

    def run() -> None:
        tok, h, c = np.zeros((batch, 1), np.int64), zero, zero
        for _ in range(TOKENS // k):
            u = rng.random((batch, k), dtype=np.float32)
            ids, _, h, c = sess.run(None, {"tokens": tok, "state_in.h": h, "state_in.c": c, "uniforms": u,
                                           **controls})  # fmt: skip
            tok = ids[:, -1:]

    return run


def main() -> int:
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lm, args in LMS.items():
            torch.manual_seed(0)
            model = RNNLanguageModel(args).eval()
            for precision in ("fp32", "int8"):
                step = Path(tmp) / f"{lm}_{precision}.onnx"
                export_lm_to_onnx(model, step)
                optimize_offline(step, step)
                convert_precision(step, step, precision)
                gens = {f"gen{k}": build_generate_graph(step, Path(tmp) / f"{lm}_{precision}_k{k}.onnx", k,
                                                        args.vocab_size) for k in KS}  # fmt: skip
                for k in KS:
                    dst = Path(tmp) / f"{lm}_{precision}_plain_k{k}.onnx"
                    gens[f"plain{k}"] = build_plain_generate_graph(step, dst, k, args.vocab_size)
                for threads in THREADS:
                    host = _session(step, threads)
                    sessions = {name: _session(p, threads) for name, p in gens.items()}
                    for batch in BATCHES:
                        runs = {"host": _host(host, args, batch), "raw": _raw(host, args, batch)}
                        for name, sess in sessions.items():
                            runs[name] = _gen(
                                sess, args, batch, int(name.removeprefix("gen").removeprefix("plain"))
                            )
                        load = os.getloadavg()[0]
                        row: dict[str, Any] = {
                            "lm": lm,
                            "precision": precision,
                            "threads": threads,
                            "batch": batch,
                        }
                        row.update({f"{n}_ms": ms for n, ms in _interleaved_medians(runs).items()})
                        row["load1"] = [load, os.getloadavg()[0]]
                        rows.append(row)
                        print(_line(row), flush=True)
    result = {
        "what": "ms per token step (all rows of the batch), median of repeats (variants interleaved); host = "
        "step graph + numpy sampler, raw = step graph alone (no sampling), genK = K-step generation graph "
        "(sampling in the graph), plainK = its plain variant (no top-k/top-p); temperature 1; load1 = the "
        "1-minute load average before and after the row",
        "onnxruntime": ort.__version__,
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "repeats": REPEATS,
        "tokens_per_run": TOKENS,
        "rows": rows,
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load {load_before} -> {result['load_after']}; wrote {OUT}")
    return 0


def _line(r: dict) -> str:
    def col(name: str) -> str:
        return f"{r[f'{name}_ms']:7.3f} ({r['host_ms'] / r[f'{name}_ms']:4.2f}x)"

    gens = " ".join(f"K{k} {col(f'gen{k}')}" for k in KS)
    plain = " ".join(f"K{k} {col(f'plain{k}')}" for k in KS)
    return (f"{r['lm']:6} {r['precision']} t{r['threads']} B{r['batch']:<3} load {r['load1'][0]:4.2f} "
            f"host {r['host_ms']:7.3f} raw {col('raw')} | cut {gens} | plain {plain}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
