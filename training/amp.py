"""Mixed-precision training on CUDA: bf16 or fp16 autocast (fp16 with a gradient scaler), fp32 elsewhere.

`--amp auto` (the default) uses bf16 where the GPU supports it and fp16 otherwise; on the CPU it is off,
so CPU runs are plain fp32 and bit-reproducible. Weights and optimiser state stay fp32 either way; the
exported graph is fp32 (export precision is a separate choice: `rnnserve export --precision`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

AMP_MODES: tuple[str, ...] = ("auto", "off", "bf16", "fp16")


class MixedPrecision:
    """Autocast context + backward/clip/step, with a GradScaler for fp16 (bf16 needs none)."""

    def __init__(self, dtype: torch.dtype | None, device: torch.device) -> None:
        self.dtype = dtype  # None: fp32, no autocast
        self.device = device
        enabled = dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled) if enabled else None

    @classmethod
    def for_config(cls, mode: str, device: torch.device) -> MixedPrecision:
        """The precision `mode` ("auto" | "off" | "bf16" | "fp16") means on `device`."""
        if mode not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {mode!r}")
        if mode == "off" or (mode == "auto" and device.type != "cuda"):
            return cls(None, device)
        if device.type != "cuda":
            raise ValueError(
                f"--amp {mode} needs a CUDA device (this run is on {device.type}); use --amp off"
            )
        if mode == "auto":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return cls(torch.bfloat16 if mode == "bf16" else torch.float16, device)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Run the forward pass (and the loss) in reduced precision where autocast deems it safe."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.dtype):
            yield

    def backward_and_step(
        self, loss: Tensor, opt: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter], clip: float
    ) -> None:
        """loss.backward(), clip the gradient norm to `clip` (on unscaled gradients), optimiser step."""
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(params, clip)
        self.scaler.step(opt)  # skips the step if the scaled gradients overflowed
        self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
