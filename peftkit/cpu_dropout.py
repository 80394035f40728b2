"""Dropout on CPU with fast random numbers. torch draws a CPU dropout mask one element at a
time (`bernoulli_`, about 6 ns per value on this 2-core machine): in a MiniLM LoRA step it was
31% of the time, more than every matrix product together. numpy's PCG64 fills the same mask
from raw 64-bit words several times faster.

The layer is still dropout: each value kept with probability 1 - p (compared at 32-bit
resolution) and scaled by 1 / (1 - p), the float mask kept for the backward pass as torch's
CPU dropout keeps it. Each call seeds its generator with a number drawn from torch's own, so
`torch.manual_seed`, Trainer's seeding and the RNG state a checkpoint restores decide the masks
exactly as they decide torch's. Off CPU, in evaluation, and at p = 0 or 1 it is torch's dropout."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class CpuDropout(nn.Dropout):
    """`nn.Dropout` whose training-mode mask on CPU comes from `keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0 < self.p < 1 or x.device.type != "cpu":
            return super().forward(x)
        noise = keep_mask(x.shape, self.p, x.dtype)
        return x.mul_(noise) if self.inplace else x * noise


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A dropout mask of `shape`: 1 / (1 - p) where a value is kept (probability 1 - p), else 0."""
    count = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, ()))  # torch's generator decides the mask
    words = np.random.PCG64(seed).random_raw((count + 1) // 2).view(np.uint32)[:count]
    threshold = np.uint32(min(round(p * 2**32), 2**32 - 1))
    noise = np.multiply(words >= threshold, np.float32(1 / (1 - p)), dtype=np.float32)  # one pass, no 0/1 copy
    return torch.from_numpy(noise).view(shape).to(dtype)


def use_cpu_dropout(model: nn.Module) -> int:
    """Makes every `nn.Dropout` layer of `model` (exactly that class: its subclasses drop other
    shapes) a `CpuDropout`, in place: the same object, so its p and the hooks a strategy hung on
    it stay. Returns how many. Dropout a model calls as a function (inside attention kernels)
    stays torch's."""
    layers = [module for module in model.modules() if type(module) is nn.Dropout]
    for layer in layers:
        layer.__class__ = CpuDropout
    return len(layers)
