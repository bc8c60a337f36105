"""Where a streamed message's time goes in the server: py-spy over rnnserve (or the no-model gRPC server)
while N sessions stream one token per message, each waiting for its reply.

    pip install py-spy                      # a dev tool, not a project dependency
    python bench/profile_serving.py                          # demo LM, 64 sessions, 20 s
    python bench/profile_serving.py --sessions 1 --seconds 15
    python bench/profile_serving.py --echo                   # bench/grpc_echo.py: the floor
    python bench/profile_serving.py --native --out prof      # C frames too (slows the server ~40%)

Prints the load's rate and p50, the server's own per-message CPU (its event-loop thread, from /proc,
not from the profiler), the mean batch and ORT run (from the server's metrics), and the event loop's
samples grouped by layer: each sample is charged to the innermost frame that belongs to a layer
(gRPC aio, protobuf, the interceptor, the handler, engine.feed, the session lock, the scheduler and its
GIL hand-off, top_candidates/numpy, metrics, asyncio itself, idle). Shares, not absolute times: the
profiler slows what it samples, and a shared machine slows everything. The raw py-spy output (one
collapsed stack per line) is written to --out for speedscope / flamegraph.pl.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from serving import Window, build_model, free_port, stream_load

from rnnserve.client import Client

# Layer of a sample: the first rule matching its innermost frame that matches any rule.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("scheduler: GIL hand-off sleep after submitting a run", ("time_sleep", "clock_nanosleep")),
    ("idle: epoll wait", ("epoll_wait", "EpollSelector.select", "select_epoll")),
    ("ORT run on the event loop (inline)", ("onnxruntime",)),
    ("protobuf (upb)", ("upb", "_message.abi3")),
    ("metrics (prometheus_client)", ("prometheus_client", "server/metrics.py")),
    ("top_candidates / numpy", ("server/sampling.py", "numpy")),
    ("interceptor (server/errors.py)", ("server/errors.py",)),
    ("session store and lock (server/sessions.py)", ("server/sessions.py",)),
    ("scheduler (scheduler, slab, runtime, executor)", ("server/scheduler.py", "server/slab.py",
                                                        "server/runtime.py", "concurrent/futures")),
    ("engine.feed (server/engine.py, applying.py, text.py)", ("server/engine.py", "server/applying.py",
                                                              "server/text.py")),
    ("handler (server/service.py)", ("server/service.py",)),
    ("gRPC aio: socket syscalls", ("sendmsg", "recvmsg", "recv (", "eventfd_write", "write (libc")),
    ("gRPC aio: Cython callbacks and C core", ("cygrpc", "grpc/")),
    ("asyncio event loop (Python 3.11)", ("asyncio", "selectors.py", "_asynciomodule", "getpid")),
]  # fmt: skip


def layer(frames: list[str], sleep_line: str) -> str:
    for frame in reversed(frames):
        if sleep_line and sleep_line in frame:
            return LAYERS[0][0]
        for name, keys in LAYERS:
            if any(k in frame for k in keys):
                return name
    return "other"


def shares(raw: Path, thread: str, sleep_line: str) -> tuple[int, collections.Counter[str]]:
    """Samples of `thread` in py-spy's raw output, by layer."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if frames and thread in frames[0]:
            counts[layer(frames[1:], sleep_line)] += int(n)
    return sum(counts.values()), counts


def main_thread_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = collections.defaultdict(float)
    pattern = r"^(rnnserve_(?:batch_size|step_latency_seconds)_(?:sum|count))\{.*\} (\S+)$"
    for name, value in re.findall(pattern, text, re.M):
        out[name] += float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="demo", choices=["demo", "design"])
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames; slows the server)")
    parser.add_argument("--echo", action="store_true", help="profile bench/grpc_echo.py instead of rnnserve")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("server_args", nargs="*", help="more `rnnserve serve` arguments (after --)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    name = "echo" if args.echo else f"rnnserve-{args.preset}"
    raw = args.out / f"profile-{name}-{args.sessions}{'-native' if args.native else ''}.txt"
    with tempfile.TemporaryDirectory() as tmp:
        _, repo = build_model(args.preset, Path(tmp))
        vocab = 96 if args.preset == "demo" else 10_000
        port, metrics_port = free_port(), free_port()
        if args.echo:
            command = [sys.executable, str(Path(__file__).with_name("grpc_echo.py")), "--port", str(port)]
        else:
            command = [sys.executable, "-m", "rnnserve", "serve", "--repo", str(repo), "--port",
                       str(port), "--metrics-port", str(metrics_port), *args.server_args]  # fmt: skip
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with Client(f"127.0.0.1:{port}") as client:
                if not client.wait_ready(timeout=120):
                    raise RuntimeError("the server did not come up")
            url = f"127.0.0.1:{port}"
            asyncio.run(stream_load(url, args.sessions, vocab, Window(0.2, 1.0)))  # warm-up
            spy = subprocess.Popen(
                ["py-spy", "record", "-p", str(server.pid), "-r", str(args.rate), "-d",
                 str(int(args.seconds)), "--threads", "-f", "raw", "-o", str(raw),
                 *(["--native"] if args.native else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            time.sleep(1.0)  # py-spy attaches
            before = {} if args.echo else scrape(metrics_port)
            cpu0, client0 = main_thread_cpu_s(server.pid), time.process_time()
            rate, latencies = asyncio.run(
                stream_load(url, args.sessions, vocab, Window(0.0, args.seconds - 2))
            )
            loop_cpu = main_thread_cpu_s(server.pid) - cpu0
            client_cpu = time.process_time() - client0
            after = {} if args.echo else scrape(metrics_port)
            spy.wait()
        finally:
            server.terminate()
            server.wait()
    latencies.sort()
    messages = rate * (args.seconds - 2)
    p50 = latencies[len(latencies) // 2] * 1e3
    print(
        f"{name}: {args.sessions} sessions streaming: {rate:,.0f} messages/s, round trip p50 {p50:.2f} ms; "
        f"CPU per message: the server's event-loop thread {loop_cpu / messages * 1e6:.0f} us, the load "
        f"generator (all its threads) {client_cpu / messages * 1e6:.0f} us"
    )
    if after:
        runs = after["rnnserve_batch_size_count"] - before.get("rnnserve_batch_size_count", 0)
        rows = after["rnnserve_batch_size_sum"] - before.get("rnnserve_batch_size_sum", 0)
        ort = after["rnnserve_step_latency_seconds_sum"] - before.get("rnnserve_step_latency_seconds_sum", 0)
        print(
            f"  {runs:,.0f} ORT runs, mean batch {rows / max(runs, 1):.1f} rows, "
            f"mean run {ort / max(runs, 1) * 1e3:.2f} ms"
        )
    sleep_line = ""
    scheduler = Path(__file__).resolve().parents[1] / "server" / "scheduler.py"
    for number, text in enumerate(scheduler.read_text().splitlines(), 1):
        if "time.sleep(WORKER_HANDOFF_S)" in text:
            sleep_line = f"scheduler.py:{number})"
    total, counts = shares(raw, "MainThread", sleep_line)
    print(f"  event-loop thread, {total} samples (py-spy {'--native' if args.native else 'Python frames'}):")
    for what, n in counts.most_common():
        print(f"    {n / max(total, 1):6.1%}  {what}")
    print(f"  raw profile: {raw}")


if __name__ == "__main__":
    main()
