"""Honest counts: trainable and total parameters, peak memory, size on disk.

Peak memory follows DESIGN.md: on CUDA, `max_memory_allocated`/`max_memory_reserved` after
`reset_peak_memory_stats`; on CPU the process high-water mark (VmHWM), reset by writing 5
to /proc/self/clear_refs, minus the resident size at the reset. The reset happens after the
libraries are imported and before the model loads, so the model's weights are counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


def stored_numel(param: torch.Tensor) -> int:
    """Parameters a tensor stands for: bitsandbytes packs two 4-bit values per byte."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2
    return param.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of the model as it will be trained."""
    trainable = total = 0
    for param in model.parameters():
        n = stored_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def trainable_line(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def _status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


@dataclass
class PeakMemory:
    """Tracks the peak memory of one run, from `start()` to `stop()`."""

    device: str = "cpu"
    baseline: int = 0

    def start(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass  # not Linux, or not allowed: VmHWM then covers the whole process
            self.baseline = _status_bytes("VmRSS")
        return self

    def stop(self) -> dict[str, int]:
        if self.device == "cuda":
            return {
                "peak_memory_bytes": torch.cuda.max_memory_allocated() - self.baseline,
                "peak_memory_reserved_bytes": torch.cuda.max_memory_reserved(),
            }
        return {"peak_memory_bytes": _status_bytes("VmHWM") - self.baseline}


def size_on_disk(directory: Path) -> int:
    """Bytes of every file under a directory."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def saved_for_backward(model: nn.Module, forward: Callable[[], Any]) -> int:
    """Bytes autograd keeps for backward while `forward()` runs `model` (each storage once, the
    model's own parameters left out): what `peftkit.memory`'s activation term predicts."""
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.setdefault(tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        forward()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in saved.items() if ptr not in parameters)


def peak_tensor_bytes(model: nn.Module, step: Callable[[], Any]) -> int:
    """The most bytes of CPU tensors that `step()` creates and holds at once (forward, backward,
    whatever it runs; `model`'s own parameters and buffers, and views of them, left out),
    storage by storage as every operator returns: what `peftkit.memory`'s training phase
    predicts, without the C allocator's slack that a resident-memory peak also holds."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    class Tracker(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, tuple[StorageWeakRef, int]] = {}
            self.peak = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            out = func(*args, **(kwargs or {}))
            self.live = {ptr: held for ptr, held in self.live.items() if not held[0].expired()}
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                    storage = tensor.untyped_storage()
                    if storage.data_ptr() not in owned and storage.data_ptr() not in self.live:
                        self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
            self.peak = max(self.peak, sum(n for _, n in self.live.values()))
            return out

    with Tracker() as tracker:
        step()
    return tracker.peak
