"""The soak benchmark (bench/soak.py) still runs end to end at a tiny size: every kind of call counted by
status with its percentiles, RSS and fd samples, the verdict, the Markdown and the plot.

Structure only: whether memory stays flat is measured by running the benchmark itself for minutes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def test_soak_benchmark_writes_its_tables_verdict_and_plot(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    config = report["config"]
    assert (config["sessions"], config["minutes"], config["sample_s"]) == (8, 0.25, 1.5)
    assert "shared" in config["note"] and config["cores"] >= 1

    ops = {o["op"]: o for o in report["ops"]}
    assert set(ops) == {"stream", "generate", "generate-cancel", "create", "close", "fork", "rotate"}
    for name in ("stream", "generate", "create", "close"):  # the common ones happen in 15 s, even slowly
        assert ops[name]["calls"] > 0, name
        assert ops[name]["p99_ms"] >= ops[name]["p50_ms"] > 0
    for o in ops.values():
        assert sum(o["codes"].values()) == o["calls"]
        assert o["errors"] == sum(n for code, n in o["codes"].items() if code != "OK")

    samples = report["samples"]
    assert len(samples) >= 3  # before the load, during it, after every session closed
    assert all(s["rss_mb"] > 0 and s["fds"] > 0 for s in samples)
    assert [s["t_s"] for s in samples] == sorted(s["t_s"] for s in samples)
    verdict = report["verdict"]
    for key in ("rss_slope_mb_per_min", "fd_delta", "rss_flat", "fd_flat", "no_internal", "ok"):
        assert key in verdict
    assert math.isfinite(verdict["rss_slope_mb_per_min"])
    assert verdict["internal_or_unknown"] == {}  # a status that is a bug is one at any size

    md = (tmp_path / "soak.md").read_text()
    assert "| stream |" in md and "## Verdict" in md and "## Samples" in md and "share the machine" in md
    assert (tmp_path / "soak.png").stat().st_size > 10_000
    assert "verdict: RSS slope after warm-up" in run.stdout
