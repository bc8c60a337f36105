"""Load benchmark: rnnserve vs the raw ONNX Runtime ceiling vs a naive PyTorch gRPC server.

In the spirit of Triton's perf_analyzer (concurrency mode over sequences): for each concurrency, that
many sessions each keep streaming single-token messages back to back (and, separately, each keep
running Generate calls of --tokens tokens back to back), on loopback; what completes inside a
measurement window after a warm-up is counted, so neither the ramp-up nor sessions ending at different
times are in the figures.

    python bench/serving.py --out docs/bench         # demo-sized LM, concurrency 1 8 32 64 128
    python bench/serving.py --preset design --idle-sessions 0 --naive-max-concurrency 64 --out docs/bench

The ceiling is the machine's best: the raw ORT loop measured with 1 and 2 intra-op threads and the
server's setting (taking turns, right before each served level), the fastest at each batch size; every
ratio in the table and the goals is against it, naming the thread count that won.

Prints a table and issue 13's goals (then issue 6's that still stand; met / missed), writes
<out>/serving[-design].json and .png: throughput vs concurrency (the raw loop per thread count and its
best), the round trip of a streamed message, and for generation the time to first token and the gap
between the messages a client receives (p50, p99). Also measures:
- the gRPC floor: one session streaming through the same client to a server that answers without a
  model (bench/grpc_echo.py), the round trip any Python gRPC server pays per message;
- generation by 64 sessions with each `--flush-sweep` interval (GenerateRequest.
  flush_interval_ms), the latency/throughput trade of packing tokens into fewer messages, and with
  Generate calls of each `--call-sweep` length (what each call's set-up costs);
- the engine in-process (bench/gpu_check_serving.py's loop, no gRPC) with 64 sessions generating;
- memory per idle session (RSS growth of a server holding --idle-sessions sessions) and create+close time.
The servers run in their own processes; the load generator (asyncio, the real client's channel,
requests and decoding; up to 64 tokens per Generate message, flush interval left to the server) shares
the same cores, so on a 2-core machine every served number pays for its own load generator too.
Generation latency is counted per message (tokens packed in one message arrive together; a per-token
gap would be ~0 for most of them and hide the wait).
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from rnnserve.client import AsyncClient, Client
from rnnserve.client.requests import TOKENS_PER_MESSAGE, generate_request
from rnnserve.client.types import GenerateMessage

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
    first_token_p50_ms: float | None = None  # generate: from sending a Generate call to its first message
    first_token_p99_ms: float | None = None
    tokens_per_message: float | None = None  # generate: mean tokens per message the client received
    threads: int | None = None  # raw ORT loop: intra-op threads (for "ort-ceiling": the fastest setting)


CEILING = "ort-ceiling"  # the raw ORT loop with its fastest thread setting at that batch size
ENGINE = "engine"  # the engine driven without gRPC (bench/gpu_check_serving.py's loop), generating
IN_PROCESS = "in-process"  # the workload of the engine's row and of the raw loop measured right before it


def percentiles(latencies_s: list[float]) -> tuple[float, float, float]:
    """p50, p90, p99 in ms (NaN for a window in which nothing completed)."""
    if not latencies_s:
        return float("nan"), float("nan"), float("nan")
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


def ceiling_threads() -> list[int]:
    """The intra-op thread counts the raw loop is measured with: 1, 2 and the server's own setting."""
    from rnnserve.server.runtime import default_intra_op_threads

    return sorted({1, 2, default_intra_op_threads()})


def threads_name(n: int) -> str:
    return f"ort {n} thread" + ("s" if n > 1 else "")


class Ceiling:
    """The raw ONNX Runtime loop: one token per sequence per step, state carried, no server.

    It runs the graph the server runs for a one-token step (the last-position graph when the bundle
    has one) and does nothing else: no sampling, no softmax, no copies. It is measured with each of
    `threads` intra-op thread counts (by default 1, 2 and the server's setting), interleaved in rounds so
    that a drift of the machine's speed hits them alike, and the fastest at each batch size is the
    ceiling: the machine's best, not the server's configuration. Measured right before each served
    load level, so that each ratio compares figures taken side by side (these machines are shared, and
    their speed drifts within a run).
    """

    def __init__(
        self,
        repo: Path,
        steps: int = 200,
        threads: list[int] | None = None,
        rounds: int = 4,
        device: str = "auto",
    ) -> None:
        from rnnserve.export.manifest import read_manifest
        from rnnserve.server.runtime import OnnxModel, RuntimeOptions

        bundle = repo / "bench" / "1"
        manifest = read_manifest(bundle)
        self.threads = threads or ceiling_threads()
        self.models = {
            n: OnnxModel(bundle, manifest, RuntimeOptions(device=device, intra_op_threads=n))
            for n in self.threads
        }
        self.vocab = manifest.vocab_size
        self.steps = steps
        self.rounds = rounds
        self._rng = np.random.default_rng(0)

    def step_times(self, batch: int) -> dict[int, list[float]]:
        """Seconds per step at `batch` for each thread count, the counts taking turns in rounds."""
        states = {n: m.initial_state(batch) for n, m in self.models.items()}
        times: dict[int, list[float]] = {n: [] for n in self.models}
        per_round = max(1, self.steps // self.rounds)
        for _ in range(self.rounds):
            for n, model in self.models.items():
                for i in range(per_round + 2):
                    tokens = self._rng.integers(0, self.vocab, size=(batch, 1))
                    start = time.perf_counter()
                    _, states[n] = model.run_last(tokens, states[n])
                    if i >= 2:  # warm-up after the other settings' turn
                        times[n].append(time.perf_counter() - start)
        return times

    def rows(self, workload: str, batch: int) -> list[Row]:
        """One row per thread count, then the best of them as "ort-ceiling" (its `threads` says which)."""
        rows = [
            Row(threads_name(n), workload, batch, batch / statistics.mean(t), *percentiles(t), threads=n)
            for n, t in self.step_times(batch).items()
        ]
        best = max(rows, key=lambda r: r.tokens_per_s)
        return [*rows, replace(best, system=CEILING)]


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


@dataclass
class GenerateLoad:
    """What the clients of a generation load level received inside the window."""

    tokens_per_s: float
    message_gaps: list[float]  # seconds between consecutive messages of one Generate call
    first_messages: list[float]  # seconds from sending a Generate call to its first message
    messages: int
    tokens: int


async def generate_load(
    url: str, concurrency: int, tokens: int, window: Window, flush_interval_ms: int | None = None
) -> GenerateLoad:
    """Every session runs Generate calls of `tokens` tokens back to back (temperature 1, seeded).

    The calls are made as `AsyncSession.generate` makes them (its request builder, the tokens per
    message it asks for, each message unpacked into its tokens as its iterator does:
    `GenerateMessage.from_pb(...).tokens`), but on the stub itself, so that the arrival time of each
    *message* is known: the gaps between messages and the time to a call's first message are what a
    user waits for. (Tokens packed in one message arrive together, so a per-token gap would be ~0 for
    most tokens, and hides the wait.)"""
    async with AsyncClient(url, timeout=120) as client:
        sessions = [await client.session("bench") for _ in range(concurrency)]
        for s in sessions:
            await s.feed([2], top_k=1)
        gaps: list[float] = []
        first_messages: list[float] = []
        counted = [0, 0]  # messages, tokens
        start, end = window.bounds()

        async def one(i: int) -> None:
            call = 0
            while (called := time.perf_counter()) < end:
                request = generate_request(
                    sessions[i].id,
                    None,
                    max_tokens=tokens,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    seed=i * 1000 + call,
                    stop=(),
                    stop_token_ids=(),
                    ignore_eos=True,
                    expected_position=None,
                    max_tokens_per_message=TOKENS_PER_MESSAGE,
                    flush_interval_ms=flush_interval_ms,
                )
                stream = client.stub.Generate(request)
                last = None
                async for response in stream:
                    now = time.perf_counter()
                    made = GenerateMessage.from_pb(response).tokens
                    if start <= now < end:
                        counted[0] += 1
                        counted[1] += len(made)
                        if last is None:
                            first_messages.append(now - called)
                        else:
                            gaps.append(now - last)
                    last = now
                    if now >= end:
                        break
                stream.cancel()
                call += 1

        await asyncio.gather(*(one(i) for i in range(concurrency)))
        for s in sessions:
            await s.close()
    messages, made = counted
    return GenerateLoad(made / window.duration_s, gaps, first_messages, messages, made)


def generate_row(system: str, concurrency: int, load: GenerateLoad) -> Row:
    """p50/p90/p99: the gap between consecutive messages of a call; first token: p50 and p99."""
    first = np.percentile(load.first_messages, [50, 99]) * 1000 if load.first_messages else [None, None]
    return Row(
        system,
        "generate",
        concurrency,
        load.tokens_per_s,
        *percentiles(load.message_gaps),
        first_token_p50_ms=None if first[0] is None else float(first[0]),
        first_token_p99_ms=None if first[1] is None else float(first[1]),
        tokens_per_message=load.tokens / load.messages if load.messages else None,
    )


@contextmanager
def server_process(command: list[str], url: str) -> Iterator[subprocess.Popen[bytes]]:
    """A server in its own process, up and answering; if it exits or does not come up within 120 s, an
    error with the end of its stderr."""
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            with Client(url) as client:
                deadline = time.monotonic() + 120
                while not client.wait_ready(timeout=1):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        stderr.seek(0)
                        tail = stderr.read().decode(errors="replace")[-3000:]
                        raise RuntimeError(f"{command[:4]} did not come up (exit {proc.poll()}):\n{tail}")
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
        print(f"  flush {interval:5d} ms c={concurrency:<4} {rate:10.0f} tok/s  message gap p99 {gap:.1f} ms")
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
                raw = ceiling.rows(workload, c)
                rows += raw
                print(
                    f"  raw ORT      {workload:8} c={c:<4} "
                    + "  ".join(f"{r.threads}t {r.tokens_per_s:8.0f}" for r in raw[:-1])
                    + f" tok/s: best {raw[-1].threads} thread(s)",
                    flush=True,
                )
            if workload == "stream":
                rate, latencies = asyncio.run(stream_load(url, c, vocab, window))
                rows.append(Row(system, workload, c, rate, *percentiles(latencies)))
            else:
                rows.append(generate_row(system, c, asyncio.run(generate_load(url, c, tokens, window))))
            r = rows[-1]
            first = f", first token p50 {r.first_token_p50_ms:.2f} ms" if r.first_token_p50_ms else ""
            shown = f"{r.tokens_per_s:10.0f} tok/s"
            what = "round trip" if workload == "stream" else "message gap"
            print(
                f"  {system:12} {workload:8} c={c:<4} {shown}  {what} p50 {r.p50_ms:.2f} ms{first}",
                flush=True,
            )
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


def find(rows: list[Row], system: str, workload: str, c: int) -> Row | None:
    return next((r for r in rows if (r.system, r.workload, r.concurrency) == (system, workload, c)), None)


def versus_best(row: Row, rows: list[Row]) -> float | None:
    """`row`'s tokens/s over the best raw ORT loop measured with it (same workload, same batch size)."""
    best = find(rows, CEILING, row.workload, row.concurrency)
    return row.tokens_per_s / best.tokens_per_s if best else None


def goals(rows: list[Row], idle: dict[str, float], at: int = 64) -> list[tuple[str, str, bool]]:
    """Issue 13's goals (then issue 6's that still stand) against this run: (goal, measured, met). Every
    ratio is against the best raw ORT loop at that batch size (the thread count that won is named)."""
    out = []

    def share(system: str, workload: str, goal: str, bound: float) -> None:
        served, best = find(rows, system, workload, at), find(rows, CEILING, workload, at)
        if served and best:
            ratio = served.tokens_per_s / best.tokens_per_s
            measured = (
                f"{ratio:.0%} ({served.tokens_per_s:,.0f} of {best.tokens_per_s:,.0f} tokens/s, "
                f"the raw loop's best with {best.threads} intra-op thread(s))"
            )
            out.append((goal, measured, ratio >= bound))

    share(
        "rnnserve", "stream", f"{at} streaming sessions: >= 50% of the best raw ORT loop at batch {at}", 0.5
    )
    one, ort1, echo = (
        find(rows, "rnnserve", "stream", 1),
        find(rows, CEILING, "stream", 1),
        find(rows, "grpc-echo", "stream", 1),
    )
    if one and ort1 and echo:
        extra = one.p50_ms - ort1.p50_ms - echo.p50_ms
        out.append(
            (
                "1 streaming session: p50 <= ORT step + the gRPC echo floor + 0.1 ms",
                f"p50 {one.p50_ms:.2f} ms = ORT step {ort1.p50_ms:.2f} ms ({ort1.threads} thread(s)) + floor "
                f"{echo.p50_ms:.2f} ms + {extra:.2f} ms",
                extra <= 0.1,
            )
        )
    share(
        "rnnserve",
        "generate",
        f"{at} generating sessions served: >= 90% of the best raw ORT loop at batch {at}",
        0.9,
    )
    share(
        ENGINE,
        IN_PROCESS,
        f"{at} generating sessions, the engine in-process: >= 100% of the best raw ORT loop at batch {at}",
        1.0,
    )
    g64, g1, naive64 = (
        find(rows, "rnnserve", "generate", at),
        find(rows, "rnnserve", "generate", 1),
        find(rows, "naive-torch", "generate", at),
    )
    if g64 and g1:
        ratio = g64.tokens_per_s / g1.tokens_per_s
        out.append((f"(issue 6) {at} generating: >= 6x one session", f"{ratio:.1f}x", ratio >= 6))
    if g64 and naive64:
        ratio = g64.tokens_per_s / naive64.tokens_per_s
        out.append((f"(issue 6) {at} generating: >= 10x the naive server", f"{ratio:.1f}x", ratio >= 10))
    if idle:
        growth, bound = idle["rss_growth_mb"], idle["rss_bound_mb(1.5x state + 300MB)"]
        out.append(
            (
                f"(issue 6) {idle['sessions']:.0f} idle sessions: RSS <= 1.5 x state + 300 MB",
                f"{growth:.0f} MB of {bound:.0f} MB",
                growth <= bound,
            )
        )
        p50, nan = idle["create_close_p50_ms"], float("nan")
        out.append(
            (
                "(issue 6) create+close p50 <= 1 ms",
                f"{p50:.2f} ms (engine alone {idle.get('engine_create_close_p50_ms', nan):.3f} ms; the same "
                f"two round trips with no model: {idle.get('grpc_echo_create_close_p50_ms', nan):.2f} ms)",
                p50 <= 1,
            )
        )
    return out


def plot(rows: list[Row], path: Path, title: str = "") -> None:
    """What a user of each system sees, against concurrency: throughput (with the raw ORT loop for each
    thread count and its best), the round trip of a streamed message, and for generation the time to
    the first token and the gap between the messages a client receives (p50 solid, p99 dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    colours = {"rnnserve": "tab:blue", "naive-torch": "tab:red", CEILING: "tab:green", ENGINE: "tab:purple"}
    names = {"rnnserve": "rnnserve", "naive-torch": "naive grpcio + PyTorch"}

    def series(system: str, workload: str) -> list[Row]:
        mine = (r for r in rows if (r.system, r.workload) == (system, workload))
        return sorted(mine, key=lambda r: r.concurrency)

    fig, axes = plt.subplots(1, 4, figsize=(22, 5.5))
    tput, stream, first, gaps = axes
    # Throughput: the best raw loop (generate and stream ceilings are the same loop; the generate one
    # is drawn), each thread count thin, the served systems, the in-process engine.
    best = series(CEILING, "generate") or series(CEILING, "stream")
    tput.plot(
        [r.concurrency for r in best],
        [r.tokens_per_s for r in best],
        color=colours[CEILING],
        marker="o",
        linewidth=2.5,
        label="raw ORT loop, best thread count (ceiling)",
    )
    counts = sorted({r.threads for r in rows if r.threads and r.system != CEILING})
    for n, marker in zip(counts, "v^<>sd", strict=False):
        mine = series(threads_name(n), best[0].workload)
        tput.plot(
            [r.concurrency for r in mine],
            [r.tokens_per_s for r in mine],
            color=colours[CEILING],
            linestyle=":",
            marker=marker,
            linewidth=1,
            zorder=3,  # over the best, which runs through one of them at every point
            label=f"raw ORT loop, {threads_name(n)[4:]}",
        )
    for system in ("rnnserve", "naive-torch"):
        for workload, style in (("stream", "--"), ("generate", "-")):
            mine = series(system, workload)
            if mine:
                tput.plot(
                    [r.concurrency for r in mine],
                    [r.tokens_per_s for r in mine],
                    color=colours[system],
                    linestyle=style,
                    marker="o",
                    label=f"{names[system]}, {'streaming input' if workload == 'stream' else 'generating'}",
                )
    for r in series(ENGINE, IN_PROCESS):
        tput.plot(
            [r.concurrency], [r.tokens_per_s], color=colours[ENGINE], marker="*", markersize=14, linestyle="",
            label="rnnserve engine in-process, generating",
        )  # fmt: skip
    tput.set_ylabel("tokens/s, all sessions together")
    tput.set_title("Throughput")

    def percentile_lines(ax: Axes, workload: str, p50: str, p99: str, what: str) -> None:
        for system in ("rnnserve", "naive-torch"):
            mine = [r for r in series(system, workload) if getattr(r, p50) is not None]
            xs = [r.concurrency for r in mine]
            for field, style, pct in ((p50, "-", "p50"), (p99, ":", "p99")):
                ys = [getattr(r, field) for r in mine]
                if any(y is not None and y == y for y in ys):  # skips all-NaN series
                    ax.plot(
                        xs,
                        ys,
                        color=colours[system],
                        linestyle=style,
                        marker="o",
                        label=f"{names[system]} {pct}",
                    )
        ax.set_ylabel(f"{what} (ms)")

    percentile_lines(stream, "stream", "p50_ms", "p99_ms", "round trip of one message")
    echo = find(rows, "grpc-echo", "stream", 1)
    if echo:
        stream.plot([1], [echo.p50_ms], color="tab:gray", marker="x", markersize=10, linestyle="",
                    label="gRPC server with no model, p50 (the floor)")  # fmt: skip
    step = series(CEILING, "stream")
    stream.plot([r.concurrency for r in step], [r.p50_ms for r in step], color=colours[CEILING], marker="o",
                linewidth=1, label="raw ORT loop, one step p50 (best threads)")  # fmt: skip
    stream.set_title("Streaming input: one token per message, each waiting for its reply")
    percentile_lines(first, "generate", "first_token_p50_ms", "first_token_p99_ms", "time to first token")
    first.set_title("Generation: time to first token (Generate call sent → first message)")
    percentile_lines(gaps, "generate", "p50_ms", "p99_ms", "gap between messages")
    gaps.set_title("Generation: gap between consecutive messages of a call")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("concurrent sessions")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax.title.set_fontsize(9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def print_table(rows: list[Row]) -> None:
    """Every row; "vs best": tokens/s over the best raw ORT loop at that batch size; "thr": the raw
    loop's intra-op threads. Stream p50/p90/p99: a message's round trip; generate: the gap between
    consecutive messages of a call; "1st": time to first token."""
    print(
        f"\n{'system':22} {'workload':9} {'conc':>5} {'tok/s':>10} {'vs best':>7} {'thr':>3} {'p50 ms':>8}"
        f" {'p90 ms':>8} {'p99 ms':>8} {'1st p50':>8} {'1st p99':>8} {'tok/msg':>7}"
    )

    def opt(v: float | None, width: int, fmt: str = ".2f") -> str:
        return f"{v:{width}{fmt}}" if v is not None else " " * width

    for r in sorted(rows, key=lambda r: (r.workload, r.concurrency, r.system)):
        share = versus_best(r, rows)
        print(
            f"{r.system:22} {r.workload:9} {r.concurrency:5d} {r.tokens_per_s:10.0f} "
            f"{opt(None if share is None else share * 100, 6, '.0f')}% {opt(r.threads, 3, 'd')} "
            f"{r.p50_ms:8.2f} {r.p90_ms:8.2f} {r.p99_ms:8.2f} {opt(r.first_token_p50_ms, 8)} "
            f"{opt(r.first_token_p99_ms, 8)} {opt(r.tokens_per_message, 7, '.1f')}"
        )


def engine_in_process(repo: Path, concurrency: int, tokens: int, ceiling: Ceiling) -> list[Row]:
    """The engine driven in-process (bench/gpu_check_serving.py's loop: no gRPC, no load generator),
    `concurrency` sessions generating `tokens` each, right after the raw loop at that batch size."""
    from gpu_check_serving import engine_rate, make_engine

    rows = ceiling.rows(IN_PROCESS, concurrency)

    async def run() -> float:
        engine = make_engine(repo, "auto")
        engine.start()
        try:
            await engine_rate(engine, concurrency, min(tokens, 64))  # warm-up
            return await engine_rate(engine, concurrency, tokens)
        finally:
            await engine.stop()

    rate = asyncio.run(run())
    nan = float("nan")
    rows.append(Row(ENGINE, IN_PROCESS, concurrency, rate, nan, nan, nan))
    print(f"  {ENGINE} c={concurrency:<4} {rate:10.0f} tok/s (generating)", flush=True)
    return rows


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
        "--skip-engine", action="store_true", help="skip the engine in-process at the goals' concurrency"
    )
    parser.add_argument(
        "--ceiling-threads",
        type=int,
        nargs="+",
        default=None,
        help="intra-op thread counts of the raw ORT loop (default: 1, 2 and the server's setting)",
    )
    parser.add_argument(
        "--naive-max-concurrency", type=int, default=0, help="run the naive server only up to this (0 = all)"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, repo = build_model(args.preset, Path(tmp))
        from rnnserve.export.manifest import read_manifest
        from rnnserve.server.runtime import default_intra_op_threads

        manifest = read_manifest(repo / "bench" / "1")
        vocab = manifest.vocab_size
        state_bytes = sum(4 * int(np.prod(s.shape_for_batch(1))) for s in manifest.state)
        print(
            f"model: LSTM {manifest.num_layers}x{manifest.hidden_size}, vocab {vocab}; {os.cpu_count()} cores"
        )
        window = Window(args.warmup, args.duration)
        ceiling = Ceiling(repo, threads=args.ceiling_threads)
        at = 64 if 64 in args.concurrency else max(args.concurrency)  # the goals' concurrency
        rows: list[Row] = []
        port = free_port()
        url = f"127.0.0.1:{port}"
        cli = [sys.executable, "-m", "rnnserve", "serve", "--repo", str(repo), "--port", str(port)]
        with server_process(cli, url):
            rows += served("rnnserve", url, args.concurrency, args.tokens, vocab, window, ceiling)
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
        if not args.skip_engine:
            rows += engine_in_process(repo, at, args.tokens, ceiling)
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
    verdicts = goals(rows, idle, at)
    print("\ngoals (issue 13, then issue 6's that still stand; ratios against the best raw ORT loop):")
    for goal, measured, met in verdicts:
        print(f"  [{'met' if met else 'MISSED'}] {goal}: {measured}")
    name = f"serving-{args.preset}" if args.preset != "demo" else "serving"
    (args.out / f"{name}.json").write_text(
        json.dumps(
            {
                "preset": args.preset,
                "command": " ".join(sys.argv),
                "cores": os.cpu_count(),
                "server_intra_op_threads": default_intra_op_threads(),
                "ceiling_threads": ceiling.threads,
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
