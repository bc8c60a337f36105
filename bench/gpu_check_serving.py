"""One-shot check of the serving engine on CUDA (runs on CPU too, saying CUDA is absent).

    python bench/gpu_check_serving.py                 # design-sized LSTM LM (vocab 10k, 2x512)
    python bench/gpu_check_serving.py --preset demo --out gpu_check.json

It exports a random-weight LM itself (no data needed), loads it into the real engine (the same
Scheduler, slab and runner the gRPC server uses) with device "auto", and checks, in under 3 minutes:
1. the provider really in use (CUDAExecutionProvider, or CPU with a note);
2. batched == unbatched: seeded generations run together give the same tokens as each alone, and
   streamed inputs run together give the same next-token distribution as alone;
3. on CUDA, that I/O binding is in use: a generating batch's states stayed on the device between steps
   (runs that found their state resident, vs copies back to the host);
4. tokens/s of the engine generating at concurrency 1, 8, 64 vs the raw ORT loop at the same batch
   sizes on the same provider (plain `session.run` with host states; on CUDA also an I/O-bound loop
   keeping the state on the device; on CPU also the loop with 1 and 2 intra-op threads besides the
   server's setting): the best of them is the ceiling, and the engine's ratio is against it.
Prints a table and a verdict line; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serving import Ceiling, build_model

from rnnserve.server.engine import Engine, GenerateRequest
from rnnserve.server.repository import ModelRepository
from rnnserve.server.runtime import CUDA, OnnxModel, RuntimeOptions, default_intra_op_threads
from rnnserve.server.sampling import SamplingParams
from rnnserve.server.scheduler import SchedulerOptions
from rnnserve.server.sessions import SessionLimits

MODEL = "bench"


def make_engine(repo: Path, device: str, generate_graphs: str = "auto", threads: int = 0) -> Engine:
    runtime = RuntimeOptions(
        device=device, intra_op_threads=threads or default_intra_op_threads(), generate_graphs=generate_graphs
    )
    return Engine(
        ModelRepository.load(repo, runtime), SessionLimits(max_sessions=1000), SchedulerOptions(max_batch=64)
    )


async def generate(engine: Engine, seed: int, tokens: int, prompt: list[int]) -> list[int]:
    session = engine.create_session(MODEL)
    request = GenerateRequest(
        SamplingParams(temperature=1.0, seed=seed), tokens, ignore_eos=True, prompt=prompt
    )
    out = [t.token_id async for batch in engine.generate(session.id, request) for t in batch]
    engine.sessions.close(session.id)
    return out


async def check_equality(engine: Engine, vocab: int) -> dict[str, Any]:
    """Generations and streamed inputs run together equal the same run alone."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, vocab, size=1 + i % 5).tolist() for i in range(16)]
    alone = [await generate(engine, i, 32, p) for i, p in enumerate(prompts)]
    together = await asyncio.gather(*(generate(engine, i, 32, p) for i, p in enumerate(prompts)))
    same_tokens = sum(a == b for a, b in zip(alone, together, strict=True))

    texts = [rng.integers(2, vocab, size=1 + i % 7).tolist() for i in range(16)]

    async def feed(ids: list[int]) -> np.ndarray:
        session = engine.create_session(MODEL)
        await engine.feed(session.id, ids)
        logprobs = engine.sessions.get(session.id).next_logprobs
        engine.sessions.close(session.id)
        assert logprobs is not None
        return logprobs

    feed_alone = [await feed(t) for t in texts]
    feed_together = await asyncio.gather(*(feed(t) for t in texts))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(feed_alone, feed_together, strict=True))
    return {
        "generations_identical": f"{same_tokens}/{len(prompts)}",
        "generation_ok": same_tokens == len(prompts),
        "stream_max_abs_logprob_diff": diff,
        "stream_ok": diff < 1e-3,
    }


async def engine_rate(engine: Engine, concurrency: int, tokens: int) -> float:
    """Aggregate tokens/s of `concurrency` sessions generating at once through the engine."""
    sessions = [engine.create_session(MODEL) for _ in range(concurrency)]
    for s in sessions:
        await engine.feed(s.id, [2])

    async def one(i: int) -> int:
        request = GenerateRequest(SamplingParams(temperature=1.0, seed=i), tokens, ignore_eos=True)
        return sum([len(batch) async for batch in engine.generate(sessions[i].id, request)])

    start = time.perf_counter()
    made = sum(await asyncio.gather(*(one(i) for i in range(concurrency))))
    elapsed = time.perf_counter() - start
    for s in sessions:
        engine.sessions.close(s.id)
    return made / elapsed


def raw_rates(model: OnnxModel, batch: int, steps: int) -> dict[str, float]:
    """The raw ORT loop at `batch`: host states (session.run) and, on CUDA, states kept on the device."""
    rng = np.random.default_rng(1)
    vocab = model.manifest.vocab_size
    session, names = model.last if model.last else (model.session, None)
    state = model.initial_state(batch)
    rates = {}
    start = time.perf_counter()
    for _ in range(steps):
        tokens = rng.integers(0, vocab, size=(batch, 1))
        _, state = model.run_last(tokens, state)
    rates["ort_host_state"] = batch * steps / (time.perf_counter() - start)
    if model.on_cuda and names is not None:
        specs = model.manifest.state
        values: list[Any] = [None] * len(specs)
        host = model.initial_state(batch)
        start = time.perf_counter()
        for _ in range(steps):
            binding = session.io_binding()
            binding.bind_cpu_input("tokens", rng.integers(0, vocab, size=(batch, 1)))
            for i, spec in enumerate(specs):
                if values[i] is None:
                    binding.bind_cpu_input(spec.input_name, host[spec.name])
                else:
                    binding.bind_ortvalue_input(spec.input_name, values[i])
            binding.bind_output(names[0], "cpu")  # logits come to the host: the sampler needs them
            for spec in specs:
                binding.bind_output(spec.output_name, "cuda")
            session.run_with_iobinding(binding)
            outputs = binding.get_outputs()
            outputs[0].numpy()
            values = list(outputs[1:])
        rates["ort_device_state"] = batch * steps / (time.perf_counter() - start)
    return rates


async def main_async(args: argparse.Namespace, repo: Path) -> dict[str, Any]:
    engine = make_engine(repo, args.device, args.generate_graphs, args.intra_op_threads)
    engine.start()
    try:
        scheduler = engine.schedulers[f"{MODEL}@1"]
        model = scheduler.model
        report: dict[str, Any] = {
            "provider": model.provider,
            "cuda": model.provider == CUDA,
            "last_graph": model.last is not None,
            "io_binding": scheduler.runner.slots.io_binding,
            "generate_graphs": args.generate_graphs,
            "generation_graphs_loaded": sorted(f"K={k}{' plain' if p else ''}" for k, p in model.generate),
        }
        print(f"provider in use: {model.provider}" + ("" if report["cuda"] else "  (CUDA is absent here)"))
        report.update(await check_equality(engine, model.manifest.vocab_size))
        hits, copies = scheduler.runner.slots.resident_hits, scheduler.runner.slots.host_copies
        await engine_rate(engine, 8, 64)  # warm-up and a generating batch for the residency check
        report["resident_hits"] = scheduler.runner.slots.resident_hits - hits
        report["host_copies"] = scheduler.runner.slots.host_copies - copies
        report["io_binding_ok"] = (not report["cuda"]) or report["resident_hits"] > 0
        # On CPU the server's thread setting is not the machine's best: the raw loop with 1 and 2
        # intra-op threads too (on 2 cores, 2 threads run batch 64 1.4-1.9x faster than 1).
        threads = None if report["cuda"] else Ceiling(repo, max(50, args.tokens), device="cpu")
        rows = []
        for c in args.concurrency:
            served = await engine_rate(engine, c, args.tokens)
            raw = raw_rates(model, c, max(50, args.tokens))
            if threads is not None:
                for n, times in threads.step_times(c).items():
                    raw[f"ort_{n}_threads"] = c / statistics.mean(times)
            best = max(raw, key=lambda k: raw[k])
            rows.append(
                {
                    "concurrency": c,
                    "engine_tok_s": served,
                    **raw,
                    "best": best,
                    "engine_over_best": served / raw[best],
                }
            )
            print(
                f"  c={c:<3} engine {served:10.0f} tok/s   "
                + "   ".join(f"{k} {v:10.0f}" for k, v in raw.items())
                + f"   engine / best raw loop ({best}) {served / raw[best]:.0%}",
                flush=True,
            )
        report["rates"] = rows
        return report
    finally:
        await engine.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="design", choices=["demo", "design"])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--tokens", type=int, default=128, help="tokens per session in the timing runs")
    parser.add_argument(
        "--intra-op-threads", type=int, default=0, help="the engine's ORT threads (0: the server's default)"
    )
    parser.add_argument(
        "--generate-graphs",
        default="auto",
        choices=["auto", "on", "off"],
        help="the server's K-step generation graphs (off: one host-sampled token per run)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        _, repo = build_model(args.preset, Path(tmp))
        report = asyncio.run(main_async(args, repo))
    report["seconds"] = time.perf_counter() - started
    checks = ["generation_ok", "stream_ok", "io_binding_ok"]
    failed = [c for c in checks if not report[c]]
    print(json.dumps({k: v for k, v in report.items() if k != "rates"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(
        "VERDICT:",
        "ok" if not failed else f"FAILED {failed}",
        f"({report['provider']}, {report['seconds']:.0f} s)",
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
