"""Where a training run's metrics go: `metrics.jsonl` always, TensorBoard event files when asked.

Each row is a flat dict with a `step` (global optimiser step); step rows carry loss/ppl/lr/tokens_per_s,
epoch rows val_loss/val_ppl/train_loss. TensorBoard (`--tensorboard`, needs `pip install tensorboard`)
gets every numeric field as a scalar under `<field>` at that step: `tensorboard --logdir RUN/tensorboard`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"


class MetricsSink:
    """Appends metric rows to a JSONL file and, optionally, mirrors them to TensorBoard."""

    def __init__(self, jsonl: Path, tensorboard_dir: Path | None = None) -> None:
        self.jsonl = jsonl
        self._tb: Any = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # torch raises this when the tensorboard package is missing
                raise ValueError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from exc
            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def write(self, row: dict[str, Any]) -> None:
        with self.jsonl.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, global_step=row["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
