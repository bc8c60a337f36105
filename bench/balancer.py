"""Load through the balancer (issue 15): generated tokens/s with 1, 2 and 3 replicas behind nginx (Debian's,
running deploy/nginx.conf with session affinity) sharing one Redis, on this machine; and what N machines
would do, from the measured per-replica figures and Redis's measured cost per command.

    python bench/balancer.py --out docs/bench                  # demo LM, 64 sessions, 3 x 15 s windows
    python bench/balancer.py --quick --out /tmp/x              # smoke test

Every configuration runs the same work: --sessions sessions, each running seeded Generate calls of --tokens
tokens back to back through the real asyncio client (which sends the session header nginx hashes), for
--seconds after a warm-up; only tokens that arrive inside the window count. "direct" is one replica
without nginx (what the balancer costs). Redis's INFO commandstats (calls, usec) over each window give the
commands per generated token and the microseconds Redis spent per command.

On one machine every replica, nginx, Redis and the load generator share the same cores: with 2 cores,
more replicas cannot mean more tokens/s (they take turns on the CPU). The estimate for N machines scales
the one-replica figure (one machine per replica, the load generator elsewhere) and checks it against
Redis's single-threaded capacity, measured here: it is an estimate, not a measurement.

Replicas run with --idle-ttl 1 so that a session created on one replica and hashed to another moves
there after a second idle (see the note in the report); the window starts after that.
Writes <out>/balancer.json, .md and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the nginx + replicas harness the balancer tests use

from nginx_server import Nginx, Replica, nginx_binary  # noqa: E402
from serving import build_model, free_port  # noqa: E402

from rnnserve.client import AsyncClient, RetryPolicy  # noqa: E402

PATIENT = RetryPolicy(max_attempts=60, initial_backoff_s=0.05, max_backoff_s=0.5)


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(directory), "--logfile", str(directory / "redis.log")], stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client, deadline = redis.Redis(port=port), time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def command_stats(url: str) -> dict[str, tuple[int, int]]:
    """Redis's commandstats: command -> (calls, usec)."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in stats.items()}


async def generate_load(
    url: str, sessions: int, tokens: int, warmup_s: float, seconds: float
) -> dict[str, Any]:
    """Tokens/s of `sessions` sessions running Generate calls back to back, counted over a window."""
    async with AsyncClient(url, timeout=60, retry=PATIENT) as client:
        opened = [await client.session("bench") for _ in range(sessions)]
        await asyncio.sleep(2.5)  # idle > --idle-ttl: a session created elsewhere is free to move
        for s in opened:
            await s.feed([2], top_k=1)  # lands on the replica its id hashes to (which takes it over)
        counted = [0]
        start = time.perf_counter() + warmup_s
        end = start + seconds

        async def one(i: int) -> None:
            call = 0
            while time.perf_counter() < end:
                stream = opened[i].generate(
                    max_tokens=tokens, temperature=1.0, seed=1000 * i + call, ignore_eos=True
                )
                async for message in stream.messages():
                    now = time.perf_counter()
                    if start <= now < end:
                        counted[0] += len(message.tokens)
                    if now >= end:
                        await stream.aclose()
                        break
                call += 1

        await asyncio.gather(*(one(i) for i in range(sessions)))
        for s in opened:
            await s.close()
    return {"tokens": counted[0], "tokens_per_s": counted[0] / seconds}


def measure(name: str, url: str, store: str, args: argparse.Namespace) -> dict[str, Any]:
    before = command_stats(store)
    t0 = time.perf_counter()
    result = asyncio.run(generate_load(url, args.sessions, args.tokens, args.warmup, args.seconds))
    wall = time.perf_counter() - t0
    after = command_stats(store)
    calls = sum(after[k][0] - before.get(k, (0, 0))[0] for k in after)
    usec = sum(after[k][1] - before.get(k, (0, 0))[1] for k in after)
    by_command = {
        k: after[k][0] - before.get(k, (0, 0))[0] for k in after if after[k][0] > before.get(k, (0, 0))[0]
    }
    row = {
        "config": name,
        **result,
        # Over the whole run (set-up included): Redis's own time per command, commands per token.
        "redis_commands": calls,
        "redis_usec_per_command": usec / calls if calls else 0.0,
        "redis_commands_per_token": calls / max(1, result["tokens"]) * args.seconds / wall,
        "redis_by_command": by_command,
    }
    print(
        f"{name:>12}: {row['tokens_per_s']:8.0f} tokens/s; Redis {calls} commands, "
        f"{row['redis_usec_per_command']:.1f} us each, {by_command}",
        flush=True,
    )
    return row


def estimate(rows: list[dict[str, Any]], machines: list[int]) -> list[dict[str, Any]]:
    """N machines, one replica each: N x the one-replica rate, until Redis (one thread) is the limit."""
    one = next(r for r in rows if r["config"] == "1 replica")
    per_token_us = one["redis_commands_per_token"] * one["redis_usec_per_command"]
    # Redis's usec counts only command execution; with network I/O a single-threaded Redis does a few
    # times less: take 3x as the real cost of a command (redis-benchmark on small SET/GET: ~100-200k/s).
    redis_tokens_per_s = 1e6 / (3 * per_token_us) if per_token_us else float("inf")
    return [
        {
            "machines": n,
            "tokens_per_s": min(n * one["tokens_per_s"], redis_tokens_per_s),
            "redis_busy": n * one["tokens_per_s"] / redis_tokens_per_s,
            "limit": "redis" if n * one["tokens_per_s"] > redis_tokens_per_s else "replicas",
        }
        for n in machines
    ]


def write(rows: list[dict[str, Any]], estimates: list[dict[str, Any]], args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "cpus": os.cpu_count(),
        "sessions": args.sessions,
        "tokens_per_call": args.tokens,
        "window_s": args.seconds,
        "model": args.preset,
    }
    (args.out / "balancer.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "estimate": estimates}, indent=1)
    )
    lines = [
        f"# Load through the balancer ({meta['cpus']} CPUs, {args.preset} LM, {args.sessions} sessions, "
        f"Generate {args.tokens} tokens per call, {args.seconds:g} s window)",
        "",
        "| configuration | tokens/s | Redis commands per token | Redis µs per command |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['tokens_per_s']:.0f} | {r['redis_commands_per_token']:.4f} | "
            f"{r['redis_usec_per_command']:.1f} |"
        )
    lines += [
        "",
        "Estimate, one replica per machine (the measured 1-replica rate times N, capped by Redis at 3x its "
        "measured µs per command):",
        "",
        "| machines | tokens/s | Redis busy | limit |",
        "|---:|---:|---:|---|",
    ]
    for e in estimates:
        lines.append(f"| {e['machines']} | {e['tokens_per_s']:.0f} | {e['redis_busy']:.0%} | {e['limit']} |")
    (args.out / "balancer.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar([r["config"] for r in rows], [r["tokens_per_s"] for r in rows], color="tab:blue")
    a.set_ylabel("generated tokens/s")
    a.set_title(f"measured on {meta['cpus']} CPUs (shared by all)")
    b.plot(
        [e["machines"] for e in estimates], [e["tokens_per_s"] for e in estimates], "o-", color="tab:green"
    )
    b.set_xlabel("machines (one replica each)")
    b.set_ylabel("tokens/s (estimate)")
    b.set_title("estimate: N x one replica, capped by Redis")
    fig.tight_layout()
    fig.savefig(args.out / "balancer.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--preset", default="demo", choices=["demo", "design"])
    add("--sessions", type=int, default=64)
    add("--tokens", type=int, default=32)
    add("--seconds", type=float, default=15.0)
    add("--warmup", type=float, default=2.0)
    add("--replicas", default="1,2,3")
    add("--quick", action="store_true", help="tiny sizes (a smoke test)")
    add("--out", type=Path, default=Path("docs/bench"))
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.seconds, args.warmup, args.replicas = 4, 1.0, 0.3, "1,2"
    binary = nginx_binary()
    if binary is None:
        sys.exit("needs nginx (apt-get install -y nginx)")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-balancer-") as tmp:
        root = Path(tmp)
        _, repo = build_model(args.preset, root / "model")
        with redis_server(root) as store:
            for n in [int(x) for x in args.replicas.split(",")]:
                with ExitStack() as stack:
                    work = root / f"n{n}"
                    work.mkdir()
                    replicas = [
                        Replica(repo, store, work / f"replica-{i}.log", "--idle-ttl", "1") for i in range(n)
                    ]
                    for r in replicas:
                        r.launch()
                        stack.callback(r.stop)
                    for r in replicas:
                        r.wait_ready()
                    if n == 1:
                        rows.append(measure("direct", replicas[0].address, store, args))
                    balancer = Nginx(binary, [r.address for r in replicas], work)
                    balancer.start()
                    stack.callback(balancer.stop)
                    rows.append(measure(f"{n} replica{'s' if n > 1 else ''}", balancer.url, store, args))
    estimates = estimate(rows, [1, 2, 4, 8, 16, 32, 64])
    write(rows, estimates, args)
    for e in estimates:
        print(
            f"estimate {e['machines']:>3} machines: {e['tokens_per_s']:9.0f} tokens/s "
            f"(Redis {e['redis_busy']:.0%})"
        )


if __name__ == "__main__":
    main()
