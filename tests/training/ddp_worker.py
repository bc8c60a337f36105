"""Run by test_ddp.py under torchrun: a tiny data-parallel LM run that saves each rank's weights after
every optimiser step as `<dump>/rank<R>_step<S>.pt` (only the test writes per-rank files like this;
the trainer itself writes from rank 0 only).

    torchrun --standalone --nproc-per-node 2 tests/training/ddp_worker.py DUMP_DIR CONFIG_JSON
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from rnnserve.training.train import TrainConfig, train_language_model


def main() -> None:
    dump, config = Path(sys.argv[1]), TrainConfig(**json.loads(sys.argv[2]))
    rank = int(os.environ["RANK"])

    def save_weights(step: int, model: torch.nn.Module) -> None:
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(weights, dump / f"rank{rank}_step{step}.pt")

    train_language_model(config, on_step=save_weights)


if __name__ == "__main__":
    main()
