"""The load benchmark still runs end to end: every system, the sweeps, the floor, the goals and the plot.

A smoke test with tiny windows (speed is measured by running the benchmark itself, never asserted here).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serving.py"


def test_serving_benchmark_writes_its_table_goals_and_plot(tmp_path: Path) -> None:
    command = [
        sys.executable, str(BENCH), "--concurrency", "1", "2", "--tokens", "8", "--duration", "0.3",
        "--warmup", "0.1", "--idle-sessions", "50", "--flush-sweep", "0", "--call-sweep", "4",
        "--out", str(tmp_path),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "serving.json").read_text())
    rows = {(r["system"], r["workload"], r["concurrency"]) for r in report["rows"]}
    for system in ("ort-ceiling", "rnnserve", "naive-torch"):
        for workload in ("stream", "generate"):
            assert {(system, workload, 1), (system, workload, 2)} <= rows
    assert {("grpc-echo", "stream", 1), ("rnnserve flush 0 ms", "generate", 2)} <= rows
    assert ("rnnserve calls of 4", "generate", 2) in rows
    assert all(r["tokens_per_s"] > 0 for r in report["rows"])
    served_generate = [r for r in report["rows"] if r["system"] == "rnnserve" and r["workload"] == "generate"]
    assert all(r["first_token_p50_ms"] > 0 for r in served_generate)
    assert report["idle"]["sessions"] == 50 and report["idle"]["grpc_echo_create_close_p50_ms"] > 0
    assert report["goals"][0]["goal"].startswith("1 streaming session")
    assert (tmp_path / "serving.png").stat().st_size > 10_000
    assert "goals (issue 6):" in run.stdout
