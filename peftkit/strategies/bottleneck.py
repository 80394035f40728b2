"""The bottleneck adapter module of strategy `adapter` (peftkit.strategies.adapters): its
layers, initialisations and the forward hooks that place it."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Adapter(nn.Module):
    """A(v) = dropout(scaling * up(act(down(v)))). Its hooks decide what v is and where A(v)
    is added: `reads` is "output" (h), "stream" (x) or "sum" (x + h); with a `ffn_norm`
    (pfeiffer on a post-LN model) the hook sits on the LayerNorm instead."""

    def __init__(self, width: int, bottleneck: int, non_linearity: str, dropout: float, scaling: float,
                 init: str, reads: Literal["output", "stream", "sum"], device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck, device=device, dtype=dtype)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck, width, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        self.scaling = scaling
        self.reads = reads
        self._captured: torch.Tensor | None = None
        with torch.no_grad():
            for linear in (self.down, self.up):
                nn.init.zeros_(linear.bias)
            if init == "bert":  # BERT's own init: normal(0, 0.02)
                nn.init.normal_(self.down.weight, std=0.02)
                nn.init.normal_(self.up.weight, std=0.02)
            elif init == "houlsby":  # near-identity: truncated normal(0, 0.01) within 2 std
                for linear in (self.down, self.up):
                    nn.init.trunc_normal_(linear.weight, std=1e-2, a=-2e-2, b=2e-2)
            else:  # zero-up (He et al.): down keeps nn.Linear's Kaiming init, A = 0 at step 0
                nn.init.zeros_(self.up.weight)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.scaling * self.up(self.act(self.down(v))))

    def capture(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook: keep the input of `module` (x, or x + h for the LayerNorm)."""
        self._captured = args[0]

    def _take(self) -> torch.Tensor:
        captured, self._captured = self._captured, None
        return captured

    def add_to_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the module whose output is h: h + A(h), h + A(x) or h + A(x + h)."""
        if self.reads == "output":
            return output + self(output)
        stream = self._take()
        return output + self(stream if self.reads == "stream" else stream + output)

    def renormalize(self, norm: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on a post-LN model's LayerNorm (pfeiffer): y = LN(x + h) becomes
        LN(x + h + A(y)); `norm.forward` applies the same norm again without re-running hooks."""
        return norm.forward(self._take() + self(output))
