"""Which precision `auto` means on a device: the one fact about the hardware a run's options
resolve against (torch is imported only when a device is asked about)."""

from __future__ import annotations

import os

from peftkit.errors import PeftkitError


def native_precision(device: str | None = None) -> str:
    """The precision `auto` means on `device` (default: this machine's). On a CUDA GPU: bf16
    where it is supported (assumed for a device named "cuda" that is not here, as in a dry run),
    else fp16. On CPU: bf16 where the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX:
    oneDNN's bf16 matrix products then run up to twice as fast as fp32 ones), else fp32.
    PEFTKIT_CPU_BF16=0 (or 1) overrides the CPU's detection, for results that must not depend
    on which CPU ran them."""
    import torch  # kept out of start-up: validating options loads no torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (PEFTKIT_CPU_BF16=0/1 decides where it is set)."""
    import torch  # kept out of start-up

    forced = os.environ.get("PEFTKIT_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise PeftkitError(f"PEFTKIT_CPU_BF16 must be 0 or 1, not {forced!r}: set one of those, or unset "
                           "it to let peftkit detect the CPU's bf16 support")
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
