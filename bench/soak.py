"""Soak benchmark: many sessions mixing every kind of call against one server for a long time, to
show that nothing accumulates (memory, file descriptors) and nothing fails.

    python bench/soak.py --minutes 10 --out docs/bench      # 64 sessions, 10 minutes
    python bench/soak.py --quick --out /tmp/soak            # the smoke test's size (seconds)

A real server in its own process (`rnnserve serve`, bench/serving.py's demo-sized LSTM, random
weights) on loopback; `--sessions` asyncio client tasks through the real async client (no retries),
each in a loop until the time is up, picking at random (seeded) among:
- stream: a few messages on the task's session's Stream (text or token ids, the stream kept open);
- generate: a Generate of 8-64 tokens, read to its end;
- generate-cancel: a Generate of 256 tokens, cancelled by the client after 2 messages;
- create+close: a session opened and closed (the two calls timed separately);
- fork: the task's session forked, the fork fed once and closed;
- rotate: the task's session closed and a new one opened (so sessions come and go).
Every call's outcome is counted by status code, every call's latency by type (p50, p99). Every
`--sample-s` seconds the server's RSS (/proc/<pid>/status VmRSS) and open file descriptors
(/proc/<pid>/fd) are sampled, with the latencies of the calls that ended since the last sample.

Verdict: RSS flat after the warm-up (least-squares slope of the samples after it, and their growth),
open fds flat (last sample minus the first after the warm-up), no INTERNAL/UNKNOWN status.
Writes <out>/soak.json, soak.md (tables) and soak.png (RSS, fds and latency over time).
The load generator shares the machine with the server (and with whatever else runs on it): latencies
include its own CPU time; the figures say how many cores there were and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from serving import build_model, free_port, rss_bytes, server_process

from rnnserve.client import AsyncClient
from rnnserve.client.aio_session import AsyncSession
from rnnserve.client.errors import RnnserveError

OPS = ["stream", "generate", "generate-cancel", "create", "close", "fork", "rotate"]
# Relative weights of what a task does next (create+close counts as one pick, timed as two calls).
PICKS = {"stream": 45, "generate": 25, "generate-cancel": 5, "create+close": 12, "fork": 8, "rotate": 5}
BAD = {"INTERNAL", "UNKNOWN", "DATA_LOSS"}  # statuses that are bugs, whatever the load
RSS_SLOPE_LIMIT_MB_PER_MIN = 1.0  # "flat": less than this after the warm-up
FD_DELTA_LIMIT = 2


@dataclass
class Sample:
    t_s: float  # since the load started
    rss_mb: float
    fds: int
    calls: int  # calls that ended since the previous sample
    p50_ms: float | None  # of those calls (all types)
    p99_ms: float | None
    client_rss_mb: float  # the load generator's own


@dataclass
class Tally:
    """What the tasks did: outcomes by (op, status) and latencies by op (all, and since the last sample)."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})
    window: list[float] = field(default_factory=list)
    examples: dict[str, str] = field(default_factory=dict)  # "op CODE" -> the first error's message

    def record(self, op: str, started: float, code: str, error: BaseException | None = None) -> None:
        elapsed = time.perf_counter() - started
        self.outcomes[(op, code)] += 1
        if error is not None:
            self.examples.setdefault(f"{op} {code}", str(error)[:500])
        self.latencies[op].append(elapsed)
        self.window.append(elapsed)


def code_of(exc: BaseException) -> str:
    if isinstance(exc, RnnserveError):
        return exc.code.name
    if isinstance(exc, grpc.RpcError):
        return exc.code().name  # type: ignore[no-any-return]
    if isinstance(exc, asyncio.TimeoutError):
        return "CLIENT_TIMEOUT"
    return f"CLIENT_{type(exc).__name__}"


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def load_task(
    i: int, client: AsyncClient, vocab: int, deadline: float, tally: Tally, seed: int
) -> None:
    """One task: its own session, and a seeded random mix of calls until the deadline."""
    rng = random.Random(seed * 1000 + i)
    session: AsyncSession | None = None

    async def timed(op: str, coro: Any) -> Any:
        started = time.perf_counter()
        try:
            result = await coro
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and time.monotonic() >= deadline:
                raise
            tally.record(op, started, code_of(exc), exc)
            return None
        tally.record(op, started, "OK")
        return result

    async def generate(session: AsyncSession, tokens: int, cancel_after: int | None) -> None:
        """As a user does it (the session's own generate: its position stays known to the client)."""
        stream = session.generate(
            max_tokens=tokens, temperature=1.0, seed=rng.randrange(2**32), ignore_eos=True
        )
        messages = 0
        async for _ in stream.messages():
            messages += 1
            if cancel_after is not None and messages >= cancel_after:
                await stream.aclose()
                break

    while time.monotonic() < deadline:
        if session is None or session.closed:
            session = await timed("create", client.session("bench"))
            if session is None:
                await asyncio.sleep(0.1)
                continue
        pick = rng.choices(list(PICKS), weights=list(PICKS.values()))[0]
        if pick == "stream":
            for _ in range(rng.randint(1, 4)):
                data: Any = (
                    [rng.randrange(2, vocab) for _ in range(rng.randint(1, 8))]
                    if rng.random() < 0.7
                    else " ".join(f"w{rng.randrange(vocab - 2)}" for _ in range(rng.randint(1, 6)))
                )
                await timed("stream", session.feed(data, top_k=rng.choice([1, 5])))
        elif pick == "generate":
            await timed("generate", generate(session, rng.randint(8, 64), None))
        elif pick == "generate-cancel":
            await timed("generate-cancel", generate(session, 256, 2))
        elif pick == "create+close":
            other = await timed("create", client.session("bench"))
            if other is not None:
                await timed("close", other.close())
        elif pick == "fork":

            async def fork(source: AsyncSession) -> None:
                forked = await source.fork()
                try:
                    await forked.feed([rng.randrange(2, vocab)], top_k=1)
                finally:
                    await forked.close()

            await timed("fork", fork(session))
        else:  # rotate
            await timed("rotate", session.close())
            session = None
    if session is not None and not session.closed:
        await timed("close", session.close())


async def soak(url: str, pid: int, vocab: int, args: argparse.Namespace) -> tuple[Tally, list[Sample]]:
    tally, samples = Tally(), []
    duration = args.minutes * 60
    start = time.monotonic()
    deadline = start + duration

    def sample() -> None:
        window, tally.window = tally.window, []
        p = np.percentile(np.asarray(window) * 1000, [50, 99]) if window else [None, None]
        samples.append(
            Sample(
                t_s=round(time.monotonic() - start, 2),
                rss_mb=rss_bytes(pid) / 2**20,
                fds=fds(pid),
                calls=len(window),
                p50_ms=None if p[0] is None else float(p[0]),
                p99_ms=None if p[1] is None else float(p[1]),
                client_rss_mb=rss_bytes(os.getpid()) / 2**20,
            )
        )
        s = samples[-1]
        shown = f"p50 {s.p50_ms:7.2f} ms  p99 {s.p99_ms:7.2f} ms" if s.p50_ms is not None else "no calls"
        print(
            f"  t={s.t_s:6.0f} s  RSS {s.rss_mb:7.1f} MB  fds {s.fds:4d}  calls {s.calls:6d}  {shown}",
            flush=True,
        )

    async def sampler() -> None:
        while True:
            await asyncio.sleep(args.sample_s)
            sample()

    async with AsyncClient(url, timeout=60, retry=None) as client:
        sample()  # before any load
        ticker = asyncio.create_task(sampler())
        tasks = [load_task(i, client, vocab, deadline, tally, args.seed) for i in range(args.sessions)]
        try:
            # Bounded: every call has a 60 s timeout, and the tasks stop starting calls at the deadline.
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=duration + 180)
        finally:
            ticker.cancel()
        sample()  # the end, every task's session closed
    return tally, samples


def fit_slope(samples: list[Sample], warmup_s: float) -> tuple[float, float, int]:
    """RSS least-squares slope (MB/min) and growth (MB, last minus first) over the samples after the
    warm-up (the final one, taken after every session closed, excluded), and how many there were."""
    after = [s for s in samples[:-1] if s.t_s >= warmup_s]
    if len(after) < 2:
        return float("nan"), float("nan"), len(after)
    t = np.array([s.t_s / 60 for s in after])
    rss = np.array([s.rss_mb for s in after])
    return float(np.polyfit(t, rss, 1)[0]), float(rss[-1] - rss[0]), len(after)


def summarize(tally: Tally, samples: list[Sample], warmup_s: float, duration_s: float) -> dict[str, Any]:
    ops = []
    for op in OPS:
        lat = tally.latencies[op]
        codes = {code: n for (o, code), n in sorted(tally.outcomes.items()) if o == op}
        p = np.percentile(np.asarray(lat) * 1000, [50, 99]) if lat else [float("nan")] * 2
        ops.append(
            {
                "op": op, "calls": len(lat), "per_s": len(lat) / duration_s, "codes": codes,
                "errors": sum(n for code, n in codes.items() if code != "OK"),
                "p50_ms": float(p[0]), "p99_ms": float(p[1]),
            }
        )  # fmt: skip
    slope, growth, n_after = fit_slope(samples, warmup_s)
    after = [s for s in samples[:-1] if s.t_s >= warmup_s] or samples
    fd_delta = samples[-1].fds - after[0].fds
    bad = {f"{op} {code}": n for (op, code), n in tally.outcomes.items() if code in BAD}
    verdict = {
        "rss_slope_mb_per_min": slope,
        "rss_growth_after_warmup_mb": growth,
        "samples_after_warmup": n_after,
        "rss_flat": bool(np.isfinite(slope) and slope < RSS_SLOPE_LIMIT_MB_PER_MIN),
        "fd_first_after_warmup": after[0].fds,
        "fd_last": samples[-1].fds,
        "fd_delta": fd_delta,
        "fd_max": max(s.fds for s in samples),
        "fd_flat": abs(fd_delta) <= FD_DELTA_LIMIT,
        "internal_or_unknown": bad,
        "no_internal": not bad,
    }
    verdict["ok"] = verdict["rss_flat"] and verdict["fd_flat"] and verdict["no_internal"]
    return {"ops": ops, "verdict": verdict, "error_examples": dict(sorted(tally.examples.items()))}


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    v, c = report["verdict"], report["config"]
    lines = [
        "# Soak benchmark",
        "",
        f"`{c['command']}`: {c['sessions']} sessions for {c['minutes']:g} min on loopback, "
        f"{c['model']}; {c['cores']} cores, load average {c['loadavg_start']} at the start and "
        f"{c['loadavg_end']} at the end. The load generator and the server share the machine "
        f"{c['note']}",
        "",
        "## Calls",
        "",
        "| call | calls | per s | errors | p50 ms | p99 ms | outcomes by status |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for o in report["ops"]:
        codes = ", ".join(f"{code} {n:,}" for code, n in o["codes"].items()) or "-"
        lines.append(
            f"| {o['op']} | {o['calls']:,} | {o['per_s']:.1f} | {o['errors']:,} | {fmt(o['p50_ms'])} "
            f"| {fmt(o['p99_ms'])} | {codes} |"
        )
    lines += [
        "",
        "## Verdict",
        "",
        f"- RSS after the warm-up ({c['warmup_s']:g} s, {v['samples_after_warmup']} samples): slope "
        f"{fmt(v['rss_slope_mb_per_min'], 3)} MB/min, growth {fmt(v['rss_growth_after_warmup_mb'])} MB: "
        f"**{'flat' if v['rss_flat'] else 'NOT flat'}** (limit {RSS_SLOPE_LIMIT_MB_PER_MIN} MB/min)",
        f"- open fds: {v['fd_first_after_warmup']} after the warm-up, {v['fd_last']} at the end (max "
        f"{v['fd_max']}), delta {v['fd_delta']:+d}: **{'flat' if v['fd_flat'] else 'NOT flat'}**",
        f"- INTERNAL/UNKNOWN: {v['internal_or_unknown'] or 'none'}",
        f"- overall: **{'PASS' if v['ok'] else 'FAIL'}**",
        "",
        "## The first error of each kind",
        "",
        *(f"- {what}: `{message}`" for what, message in report["error_examples"].items()),
        *(["- none"] if not report["error_examples"] else []),
        "",
        f"## Samples (every {c['sample_s']:g} s; the last after every session closed)",
        "",
        "| t s | RSS MB | fds | calls | p50 ms | p99 ms | client RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["samples"]:
        lines.append(
            f"| {s['t_s']:.0f} | {s['rss_mb']:.1f} | {s['fds']} | {s['calls']:,} | {fmt(s['p50_ms'])} "
            f"| {fmt(s['p99_ms'])} | {s['client_rss_mb']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, c, v = report["samples"], report["config"], report["verdict"]
    t = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    ax.plot(t, [s["rss_mb"] for s in samples], marker=".", label="server RSS")
    ax.axvline(c["warmup_s"] / 60, color="grey", ls=":", label="end of warm-up")
    ax.set(
        xlabel="minutes", ylabel="MB", title=f"server RSS (slope {fmt(v['rss_slope_mb_per_min'], 3)} MB/min)"
    )
    ax.legend()
    ax = axes[1]
    ax.plot(t, [s["fds"] for s in samples], marker=".", color="tab:green")
    ax.axvline(c["warmup_s"] / 60, color="grey", ls=":")
    ax.set(
        xlabel="minutes", ylabel="open fds", title=f"server open file descriptors (delta {v['fd_delta']:+d})"
    )
    ax = axes[2]
    timed = [s for s in samples if s["p50_ms"] is not None]
    ax.plot([s["t_s"] / 60 for s in timed], [s["p50_ms"] for s in timed], marker=".", label="p50 (all calls)")
    ax.plot([s["t_s"] / 60 for s in timed], [s["p99_ms"] for s in timed], marker=".", label="p99 (all calls)")
    ax.set_yscale("log")
    ax.set(xlabel="minutes", ylabel="ms", title="latency per sampling interval")
    ax.legend()
    fig.suptitle(
        f"soak: {c['sessions']} sessions, {c['minutes']:g} min, {c['model']}, {c['cores']} cores (shared)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between RSS/fd samples")
    parser.add_argument("--warmup-minutes", type=float, default=None, help="default: 20%% of --minutes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="(and with the other jobs on it: a shared 2-core machine).")
    parser.add_argument("--quick", action="store_true", help="8 sessions for 15 s, samples every 1.5 s")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.sessions, args.sample_s = 0.25, 8, 1.5
    warmup_s = 60 * (args.warmup_minutes if args.warmup_minutes is not None else 0.2 * args.minutes)
    args.out.mkdir(parents=True, exist_ok=True)
    loadavg_start = "/".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        _, repo = build_model("demo", Path(tmp))
        from rnnserve.export.manifest import read_manifest

        manifest = read_manifest(repo / "bench" / "1")
        vocab = manifest.vocab_size
        model = f"LSTM {manifest.num_layers}x{manifest.hidden_size}, vocab {vocab}"
        port = free_port()
        url = f"127.0.0.1:{port}"
        cli = [sys.executable, "-m", "rnnserve", "serve", "--repo", str(repo), "--port", str(port)]
        print(f"soak: {args.sessions} sessions for {args.minutes:g} min, {model}; {os.cpu_count()} cores")
        with server_process(cli, url) as proc:
            tally, samples = asyncio.run(soak(url, proc.pid, vocab, args))
    duration_s = args.minutes * 60
    report: dict[str, Any] = {
        "config": {
            "command": " ".join(["python", "bench/soak.py", *sys.argv[1:]]),
            "sessions": args.sessions,
            "minutes": args.minutes,
            "sample_s": args.sample_s,
            "warmup_s": warmup_s,
            "seed": args.seed,
            "model": model,
            "cores": os.cpu_count(),
            "loadavg_start": loadavg_start,
            "loadavg_end": "/".join(f"{x:.2f}" for x in os.getloadavg()),
            "note": args.note,
            "picks": PICKS,
        },
        **summarize(tally, samples, warmup_s, duration_s),
        "samples": [asdict(s) for s in samples],
    }
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    (args.out / "soak.md").write_text(markdown(report))
    plot(report, args.out / "soak.png")
    print()
    for o in report["ops"]:
        codes = ", ".join(f"{code} {n}" for code, n in o["codes"].items())
        p50, p99 = fmt(o["p50_ms"]), fmt(o["p99_ms"])
        print(f"  {o['op']:16} {o['calls']:8,} calls  p50 {p50:>8} ms  p99 {p99:>8} ms  {codes}")
    for what, message in report["error_examples"].items():
        print(f"  first {what}: {message[:300]}")
    v = report["verdict"]
    print(
        f"\nverdict: RSS slope after warm-up {fmt(v['rss_slope_mb_per_min'], 3)} MB/min "
        f"({'flat' if v['rss_flat'] else 'NOT flat'}), growth {fmt(v['rss_growth_after_warmup_mb'])} MB; "
        f"fds {v['fd_first_after_warmup']} -> {v['fd_last']} ({'flat' if v['fd_flat'] else 'NOT flat'}); "
        f"INTERNAL/UNKNOWN: {v['internal_or_unknown'] or 'none'}: {'PASS' if v['ok'] else 'FAIL'}"
    )
    print(f"wrote {args.out / 'soak.json'}, soak.md and soak.png")


if __name__ == "__main__":
    main()
