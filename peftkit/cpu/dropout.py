"""Dropout on CPU with fast random numbers. torch draws a CPU dropout mask one element at a
time (`bernoulli_`, about 6 ns per value on this 2-core machine): in a MiniLM LoRA step it was
31% of the time, more than every matrix product together. numpy's PCG64 fills the same mask
from raw 64-bit words several times faster, 16 bits per value.

The layer is still dropout: each value kept with probability 1 - p (compared at 16-bit
resolution: p within 2^-17 of the one asked for) and scaled by 1 / (1 - p) in the input's
dtype, the float mask kept for the backward pass as torch's CPU dropout keeps it. Each call
seeds its generator with a number drawn from torch's own, so `torch.manual_seed`, Trainer's
seeding and the RNG state a checkpoint restores decide the masks exactly as they decide
torch's. Off CPU, in evaluation, and for p outside [2^-17, 1 - 2^-17] (0 and 1 among them),
which 16 bits cannot resolve, it is torch's dropout."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


RESOLVED_P = (2**-17, 1 - 2**-17)  # the rates 16-bit draws resolve to within 2^-17


class CpuDropout(nn.Dropout):
    """`nn.Dropout` whose training-mode mask on CPU comes from `keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not RESOLVED_P[0] <= self.p <= RESOLVED_P[1] or x.device.type != "cpu":
            return super().forward(x)
        noise = keep_mask(x.shape, self.p, x.dtype)
        return x.mul_(noise) if self.inplace else x * noise


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A dropout mask of `shape`: 1 / (1 - p) where a value is kept (probability 1 - p, resolved
    to 1/65,536: 16 random bits per value), else 0. A bf16/fp16 mask is the scale's own 16-bit
    pattern where kept, with no fp32 mask to convert (a bf16 mask of 16 x 25 x 576 values,
    one SmolLM2 LoRA input, took 0.18 ms here against 0.69 ms from 32-bit draws and an fp32
    mask converted)."""
    count = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, ()))  # torch's generator decides the mask
    words = np.random.PCG64(seed).random_raw((count + 3) // 4).view(np.uint16)[:count]
    kept = words >= np.uint16(min(round(p * 2**16), 2**16 - 1))
    if dtype in (torch.bfloat16, torch.float16):
        scale = torch.tensor(1 / (1 - p), dtype=dtype).view(torch.int16).item() & 0xFFFF
        return torch.from_numpy(np.multiply(kept, np.uint16(scale), dtype=np.uint16)).view(dtype).view(shape)
    noise = np.multiply(kept, np.float32(1 / (1 - p)), dtype=np.float32)  # one pass, no 0/1 copy
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
