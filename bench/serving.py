"""Load benchmark: rnnserve vs the raw ONNX Runtime ceiling vs a naive PyTorch gRPC server.

In the spirit of Triton's perf_analyzer (concurrency mode over sequences): for each concurrency, that
many sessions each keep streaming single-token messages back to back (and, separately, each keep
running Generate calls of --tokens tokens back to back), on loopback; what completes inside a
measurement window after a warm-up is counted, so neither the ramp-up nor sessions ending at different
times are in the figures.

    python bench/serving.py --out docs/bench         # demo-sized LM, concurrency 1 8 32 64 128
    python bench/serving.py --preset design --idle-sessions 0 --naive-max-concurrency 64 --out docs/bench

Prints a table and issue 6's goals (met / missed), writes <out>/serving[-design].json and .png
(throughput vs concurrency; latency p50/p90/p99). Also measures:
- the gRPC floor: one session streaming through the same client to a server that answers without a
  model (bench/grpc_echo.py), the round trip any Python gRPC server pays per message;
- generation by 64 sessions with each `--flush-sweep` interval (GenerateRequest.
  flush_interval_ms), the latency/throughput trade of packing tokens into fewer messages, and with
  Generate calls of each `--call-sweep` length (what each call's set-up costs);
- memory per idle session (RSS growth of a server holding --idle-sessions sessions) and create+close time.
The servers run in their own processes; the load generator (asyncio, the real client, which asks for up
to 64 tokens per Generate message and leaves the flush interval to the server) shares the same cores, so
on a 2-core machine every served number pays for its own load generator too. Generate "latency" is the
gap between consecutive tokens as the client sees them (tokens packed in one message arrive together).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rnnserve.client import AsyncClient, Client

PRESETS = {
    # name: (tokenizer words, embedding, hidden, layers)
    "demo": (96, 128, 256, 2),
    "design": (10_000, 256, 512, 2),
}


@dataclass
class Row:
    system: str
    workload: str  # "stream" | "generate"
    concurrency: int
    tokens_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    first_token_p50_ms: float | None = None  # generate: from sending a Generate call to its first token


def percentiles(latencies_s: list[float]) -> tuple[float, float, float]:
    p = np.percentile(np.asarray(latencies_s) * 1000, [50, 90, 99])
    return float(p[0]), float(p[1]), float(p[2])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_model(preset: str, root: Path) -> tuple[Path, Path]:
    """A random-weights LSTM LM of the preset's size: (checkpoint, model repository)."""
    import torch

    from rnnserve.export.onnx_export import export_checkpoint
    from rnnserve.training.config import TrainConfig
    from rnnserve.training.model import ModelArgs, RNNLanguageModel
    from rnnserve.training.tokenizer import build_word_tokenizer
    from rnnserve.training.train import save_checkpoint

    words, emb, hidden, layers = PRESETS[preset]
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(" ".join(f"w{i}" for i in range(words - 2)))
    args = ModelArgs("lstm", tokenizer.get_vocab_size(), emb, hidden, layers, dropout=0.0)
    run = root / "run"
    run.mkdir(parents=True)
    tokenizer.save(str(run / "tokenizer.json"))
    config = TrainConfig(
        tokenizer="word", cell="lstm", layers=layers, hidden=hidden, emb=emb, out_dir=str(run)
    )
    save_checkpoint(run / "checkpoint.pt", RNNLanguageModel(args).eval(), config, {"val_ppl": float("nan")})
    export_checkpoint(run / "checkpoint.pt", root / "repo", "bench")
    return run / "checkpoint.pt", root / "repo"


class Ceiling:
    """A raw ONNX Runtime loop: one token per sequence per step, state carried, no server.

    It runs the graph the server runs for a one-token step (the last-position graph when the bundle
    has one), with the server's thread setting, and does nothing else: no sampling, no softmax, no
    copies. Measured right before each served load level, so that each ratio compares figures taken
    side by side (these machines are shared, and their speed drifts within a run).
    """

    def __init__(self, repo: Path, steps: int = 200) -> None:
        from rnnserve.export.manifest import read_manifest
        from rnnserve.server.runtime import OnnxModel, RuntimeOptions, default_intra_op_threads

        bundle = repo / "bench" / "1"
        self.model = OnnxModel(
            bundle, read_manifest(bundle), RuntimeOptions(intra_op_threads=default_intra_op_threads())
        )
        self.steps = steps
        self._rng = np.random.default_rng(0)

    def row(self, workload: str, batch: int) -> Row:
        state = self.model.initial_state(batch)
        times = []
        for i in range(self.steps + 5):
            tokens = self._rng.integers(0, self.model.manifest.vocab_size, size=(batch, 1))
            start = time.perf_counter()
            _, state = self.model.run_last(tokens, state)
            if i >= 5:  # warm-up
                times.append(time.perf_counter() - start)
        return Row("ort-ceiling", workload, batch, batch / statistics.mean(times), *percentiles(times))


@dataclass(frozen=True)
class Window:
    """A measurement window, as perf_analyzer does it: every session keeps its work in flight from the
    start, only what completes between `warmup_s` and `warmup_s + duration_s` counts (no ramp-up, no
    tail of sessions finishing at different times)."""

    warmup_s: float = 0.5
    duration_s: float = 3.0

    def bounds(self) -> tuple[float, float]:
        """(start, end) in perf_counter() time, from now."""
        start = time.perf_counter() + self.warmup_s
        return start, start + self.duration_s


async def stream_load(url: str, concurrency: int, vocab: int, window: Window) -> tuple[float, list[float]]:
    """Every session sends single-token messages back to back; returns (tokens/s, round trips), both
    counted in the window."""
    async with AsyncClient(url, timeout=120) as client:
        sessions = [await client.session("bench") for _ in range(concurrency)]
        latencies: list[float] = []
        start, end = window.bounds()

        async def one(i: int) -> None:
            session, n = sessions[i], 0
            while (sent := time.perf_counter()) < end:
                await session.feed([(i * 31 + n) % vocab], top_k=1)
                n += 1
                if (now := time.perf_counter()) >= start and now < end:
                    latencies.append(now - sent)

        await asyncio.gather(*(one(i) for i in range(concurrency)))
        for s in sessions:
            await s.close()
    return len(latencies) / window.duration_s, latencies


async def generate_load(
    url: str, concurrency: int, tokens: int, window: Window, flush_interval_ms: int | None = None
) -> tuple[float, list[float], list[float]]:
    """Every session runs Generate calls of `tokens` tokens back to back; returns (tokens/s, gaps between
    a stream's consecutive tokens, times from a call to its first token), all counted in the window."""
    async with AsyncClient(url, timeout=120) as client:
        sessions = [await client.session("bench") for _ in range(concurrency)]
        for s in sessions:
            await s.feed([2], top_k=1)
        gaps: list[float] = []
        first_tokens: list[float] = []
        start, end = window.bounds()

        async def one(i: int) -> None:
            last, call = time.perf_counter(), 0
            while last < end:
                called, first = time.perf_counter(), True
                stream = sessions[i].generate(
                    max_tokens=tokens,
                    temperature=1.0,
                    seed=i * 1000 + call,
                    ignore_eos=True,
                    flush_interval_ms=flush_interval_ms,
                )
                async for _ in stream:
                    now = time.perf_counter()
                    if start <= now < end:
                        gaps.append(now - last)
                        if first:
                            first_tokens.append(now - called)
                    last, first = now, False
                    if now >= end:
                        break
                await stream.aclose()
                call += 1

        await asyncio.gather(*(one(i) for i in range(concurrency)))
        for s in sessions:
            await s.close()
    return len(gaps) / window.duration_s, gaps, first_tokens


def generate_row(system: str, concurrency: int, load: tuple[float, list[float], list[float]]) -> Row:
    rate, gaps, first_tokens = load
    first = float(np.percentile(first_tokens, 50) * 1000) if first_tokens else None
    return Row(system, "generate", concurrency, rate, *percentiles(gaps), first_token_p50_ms=first)


@contextmanager
def server_process(command: list[str], url: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with Client(url) as client:
            if not client.wait_ready(timeout=120):
                raise RuntimeError(f"{command[:4]} did not come up")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def flush_sweep(
    url: str, concurrency: int, tokens: int, window: Window, intervals_ms: list[int]
) -> list[Row]:
    """Generation at one concurrency with each flush interval the clients may ask for."""
    rows = []
    for interval in intervals_ms:
        load = asyncio.run(generate_load(url, concurrency, tokens, window, interval))
        rows.append(generate_row(f"rnnserve flush {interval} ms", concurrency, load))
        rate, gap = rows[-1].tokens_per_s, rows[-1].p99_ms
        print(f"  flush {interval:5d} ms c={concurrency:<4} {rate:10.0f} tok/s  gap p99 {gap:.1f} ms")
    return rows


def call_sweep(url: str, concurrency: int, lengths: list[int], window: Window) -> list[Row]:
    """Generation at one concurrency with Generate calls of each length (each call pays an RPC's set-up
    and a turn out of the running batch between calls)."""
    rows = []
    for length in lengths:
        load = asyncio.run(generate_load(url, concurrency, length, window))
        rows.append(generate_row(f"rnnserve calls of {length}", concurrency, load))
        print(f"  calls of {length:5d} c={concurrency:<4} {rows[-1].tokens_per_s:10.0f} tok/s", flush=True)
    return rows


def create_close_p50_ms(url: str, pairs: int = 2000) -> float:
    """p50 of opening and closing a session: two unary round trips through the sync client, as a user
    does it."""
    with Client(url) as client:
        times = []
        for _ in range(pairs):
            start = time.perf_counter()
            client.session("bench").close()
            times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1000)


def grpc_floor(vocab: int, window: Window) -> tuple[Row, float]:
    """bench/grpc_echo.py, a server with no model behind it, through the same clients: one session
    streaming single-token messages, and create+close p50 (ms): the gRPC round trips alone."""
    port = free_port()
    echo = [sys.executable, str(Path(__file__).with_name("grpc_echo.py")), "--port", str(port)]
    with server_process(echo, f"127.0.0.1:{port}"):
        rate, latencies = asyncio.run(stream_load(f"127.0.0.1:{port}", 1, vocab, window))
        create_close = create_close_p50_ms(f"127.0.0.1:{port}")
    row = Row("grpc-echo", "stream", 1, rate, *percentiles(latencies))
    print(f"  grpc-echo    stream   c=1    {rate:10.0f} tok/s  p50 {row.p50_ms:.2f} ms", flush=True)
    print(f"  grpc-echo    create+close p50 {create_close:.2f} ms", flush=True)
    return row, create_close


def served(
    system: str,
    url: str,
    concurrencies: list[int],
    tokens: int,
    vocab: int,
    window: Window,
    ceiling: Ceiling | None = None,
) -> list[Row]:
    """Each load level through the real client; with `ceiling`, the raw loop at that batch size just
    before each."""
    rows = []
    for c in concurrencies:
        for workload in ("stream", "generate"):
            if ceiling is not None:
                rows.append(ceiling.row(workload, c))
            if workload == "stream":
                rate, latencies = asyncio.run(stream_load(url, c, vocab, window))
                rows.append(Row(system, workload, c, rate, *percentiles(latencies)))
            else:
                rows.append(generate_row(system, c, asyncio.run(generate_load(url, c, tokens, window))))
            r = rows[-1]
            first = f", first token p50 {r.first_token_p50_ms:.2f} ms" if r.first_token_p50_ms else ""
            rate = f"{r.tokens_per_s:10.0f} tok/s"
            print(f"  {system:12} {workload:8} c={c:<4} {rate}  p50 {r.p50_ms:.2f} ms{first}", flush=True)
    return rows


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def idle_sessions(url: str, pid: int, count: int, state_bytes: int) -> dict[str, float]:
    """Memory of `count` idle sessions held at once, and create+close latency (two unary round trips
    through the sync client, as a user does it)."""
    create_close = create_close_p50_ms(url)
    with Client(url) as client:
        before = rss_bytes(pid)
        sessions = [client.session("bench") for _ in range(count)]
        after = rss_bytes(pid)
        for s in sessions:
            s.close()
    return {
        "sessions": count,
        "state_bytes_per_session": state_bytes,
        "rss_growth_mb": (after - before) / 2**20,
        "rss_per_session_bytes": (after - before) / count,
        "rss_bound_mb(1.5x state + 300MB)": (1.5 * state_bytes * count) / 2**20 + 300,
        "create_close_p50_ms": create_close,
    }


def engine_create_close(repo: Path, count: int = 20_000) -> float:
    """p50 of create+close inside the engine (no gRPC): the server's own share of the round trips."""
    from rnnserve.server.engine import Engine
    from rnnserve.server.repository import ModelRepository

    engine = Engine(ModelRepository.load(repo))
    times = []
    for _ in range(count):
        start = time.perf_counter()
        engine.sessions.close(engine.create_session("bench").id)
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1000)


def goals(rows: list[Row], idle: dict[str, float]) -> list[tuple[str, str, bool]]:
    """Issue 6's goals against this run: (goal, measured, met)."""

    def row(system: str, workload: str, c: int) -> Row | None:
        return next((r for r in rows if (r.system, r.workload, r.concurrency) == (system, workload, c)), None)

    out = []
    one, ort1, echo = (
        row("rnnserve", "stream", 1),
        row("ort-ceiling", "stream", 1),
        row("grpc-echo", "stream", 1),
    )
    if one and ort1:
        extra = one.p50_ms - ort1.p50_ms
        floor = f" (a gRPC round trip with no model: {echo.p50_ms:.2f} ms)" if echo else ""
        out.append(
            (
                "1 streaming session: p50 <= ORT step + 0.3 ms",
                f"ORT step + {extra:.2f} ms{floor}",
                extra <= 0.3,
            )
        )
    g64, ort64 = row("rnnserve", "generate", 64), row("ort-ceiling", "generate", 64)
    g1, naive64 = row("rnnserve", "generate", 1), row("naive-torch", "generate", 64)
    if g64 and ort64:
        share = g64.tokens_per_s / ort64.tokens_per_s
        out.append(("64 generating: >= 80% of raw ORT at batch 64", f"{share:.0%}", share >= 0.8))
    if g64 and g1:
        ratio = g64.tokens_per_s / g1.tokens_per_s
        out.append(("64 generating: >= 6x one session", f"{ratio:.1f}x", ratio >= 6))
    if g64 and naive64:
        ratio = g64.tokens_per_s / naive64.tokens_per_s
        out.append(("64 generating: >= 10x the naive server", f"{ratio:.1f}x", ratio >= 10))
    if idle:
        growth, bound = idle["rss_growth_mb"], idle["rss_bound_mb(1.5x state + 300MB)"]
        out.append(
            (
                f"{idle['sessions']:.0f} idle sessions: RSS <= 1.5 x state + 300 MB",
                f"{growth:.0f} MB of {bound:.0f} MB",
                growth <= bound,
            )
        )
        p50, nan = idle["create_close_p50_ms"], float("nan")
        out.append(
            (
                "create+close p50 <= 1 ms",
                f"{p50:.2f} ms (engine alone {idle.get('engine_create_close_p50_ms', nan):.3f} ms; the same "
                f"two round trips with no model: {idle.get('grpc_echo_create_close_p50_ms', nan):.2f} ms)",
                p50 <= 1,
            )
        )
    return out


def plot(rows: list[Row], path: Path, title: str = "") -> None:
    """Throughput and latency percentiles vs concurrency; the ORT ceiling once (same for both loads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"ort-ceiling": "tab:green", "rnnserve": "tab:blue", "naive-torch": "tab:red"}
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    for system, workload in sorted({(r.system, r.workload) for r in rows}):
        if (system == "ort-ceiling" and workload != "generate") or system not in colours:
            continue  # the ceiling once; the one-concurrency extras are in the table
        mine = sorted(
            (r for r in rows if (r.system, r.workload) == (system, workload)), key=lambda r: r.concurrency
        )
        label = "raw ORT loop (ceiling)" if system == "ort-ceiling" else f"{system} {workload}"
        style = dict(color=colours.get(system), linestyle="--" if workload == "stream" else "-", marker="o")
        xs = [r.concurrency for r in mine]
        for ax, values in zip(
            axes,
            [
                [r.tokens_per_s for r in mine],
                [r.p50_ms for r in mine],
                [r.p90_ms for r in mine],
                [r.p99_ms for r in mine],
            ],
            strict=True,
        ):
            ax.plot(xs, values, label=label, **style)  # type: ignore[arg-type]
    names = ["tokens/s (all sessions)", "per-token latency p50 (ms)", "p90 (ms)", "p99 (ms)"]
    for ax, name in zip(axes, names, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent sessions")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def print_table(rows: list[Row]) -> None:
    print(
        f"\n{'system':12} {'workload':9} {'conc':>5} {'tok/s':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}"
        f" {'1st tok ms':>10}"
    )
    for r in sorted(rows, key=lambda r: (r.workload, r.concurrency, r.system)):
        first = f"{r.first_token_p50_ms:10.2f}" if r.first_token_p50_ms is not None else f"{'':10}"
        print(
            f"{r.system:12} {r.workload:9} {r.concurrency:5d} {r.tokens_per_s:10.0f} "
            f"{r.p50_ms:8.2f} {r.p90_ms:8.2f} {r.p99_ms:8.2f} {first}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    parser.add_argument("--tokens", type=int, default=256, help="max_tokens of each Generate call")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per load level")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of each level not measured")
    parser.add_argument("--idle-sessions", type=int, default=100_000)
    parser.add_argument(
        "--flush-sweep",
        type=int,
        nargs="*",
        default=[0, 20, 50, 100],
        help="flush intervals (ms) to run generation with at 64 sessions (none: skip)",
    )
    parser.add_argument(
        "--call-sweep",
        type=int,
        nargs="*",
        default=[16, 64, 1024],
        help="Generate call lengths (max_tokens) to run at 64 sessions (none: skip)",
    )
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--naive-max-concurrency", type=int, default=0, help="run the naive server only up to this (0 = all)"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, repo = build_model(args.preset, Path(tmp))
        from rnnserve.export.manifest import read_manifest

        manifest = read_manifest(repo / "bench" / "1")
        vocab = manifest.vocab_size
        state_bytes = sum(4 * int(np.prod(s.shape_for_batch(1))) for s in manifest.state)
        print(
            f"model: LSTM {manifest.num_layers}x{manifest.hidden_size}, vocab {vocab}; {os.cpu_count()} cores"
        )
        window = Window(args.warmup, args.duration)
        ceiling = Ceiling(repo)
        rows: list[Row] = []
        port = free_port()
        url = f"127.0.0.1:{port}"
        cli = [sys.executable, "-m", "rnnserve.client.cli", "serve", "--repo", str(repo), "--port", str(port)]
        with server_process(cli, url):
            rows += served("rnnserve", url, args.concurrency, args.tokens, vocab, window, ceiling)
            at = 64 if 64 in args.concurrency else max(args.concurrency)  # the goals' concurrency
            if args.flush_sweep:
                rows += flush_sweep(url, at, args.tokens, window, args.flush_sweep)
            if args.call_sweep:
                rows += call_sweep(url, at, args.call_sweep, window)
        echo_row, echo_create_close = grpc_floor(vocab, window)
        rows.append(echo_row)
        if not args.skip_naive:
            port = free_port()
            naive = [
                sys.executable,
                str(Path(__file__).with_name("naive_server.py")),
                "--checkpoint",
                str(checkpoint),
                "--port",
                str(port),
            ]
            with server_process(naive, f"127.0.0.1:{port}"):
                levels = [
                    c
                    for c in args.concurrency
                    if not args.naive_max_concurrency or c <= args.naive_max_concurrency
                ]
                rows += served("naive-torch", f"127.0.0.1:{port}", levels, args.tokens, vocab, window)
        idle: dict[str, float] = {}
        if args.idle_sessions:
            port = free_port()
            cli[-1] = str(port)
            cli += ["--max-sessions", str(args.idle_sessions + 1000)]
            with server_process(cli, f"127.0.0.1:{port}") as proc:
                idle = idle_sessions(f"127.0.0.1:{port}", proc.pid, args.idle_sessions, state_bytes)
            idle["engine_create_close_p50_ms"] = engine_create_close(repo)
            idle["grpc_echo_create_close_p50_ms"] = echo_create_close
    print_table(rows)
    if idle:
        print("\nidle sessions: " + ", ".join(f"{k} {v:.3g}" for k, v in idle.items()))
    verdicts = goals(rows, idle)
    print("\ngoals (issue 6):")
    for goal, measured, met in verdicts:
        print(f"  [{'met' if met else 'MISSED'}] {goal}: {measured}")
    name = f"serving-{args.preset}" if args.preset != "demo" else "serving"
    (args.out / f"{name}.json").write_text(
        json.dumps(
            {
                "preset": args.preset,
                "command": " ".join(sys.argv),
                "cores": os.cpu_count(),
                "rows": [asdict(r) for r in rows],
                "idle": idle,
                "goals": [{"goal": g, "measured": m, "met": ok} for g, m, ok in verdicts],
            },
            indent=2,
        )
    )
    plot(
        rows,
        args.out / f"{name}.png",
        f"{args.preset} model: {manifest.num_layers}x{manifest.hidden_size} LSTM, vocab {vocab}",
    )
    print(f"\nwrote {args.out / (name + '.json')} and {args.out / (name + '.png')}")


if __name__ == "__main__":
    main()
