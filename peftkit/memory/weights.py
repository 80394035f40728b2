"""What the parameters themselves hold: the stored weights and the gradients backward holds.

Weights: frozen tensors in the run's dtype, trained ones (and their modules' frozen
neighbours, `kept_fp32`) in fp32; a 4-bit base stores half a byte per value plus its
quantization constants (one fp32 absmax per 64-value block, or with double quantization one
byte per block plus one fp32 per 256 blocks). An LM head tied to the embeddings is stored once.

Gradients: 4 bytes per trainable parameter (fp32, also under mixed precision), alive in the
training phase only. Backward frees each layer's saved activations as that layer's gradients
appear, so a step holds the larger of its start and its end, not their sum
(`backward_gradient_terms` gives both ends; `peftkit.memory.estimate.Estimate` takes the max).
"""

from __future__ import annotations

from torch import nn

from peftkit.anatomy import inspect_model, unwrap_peft

BLOCK = 64  # bitsandbytes 4-bit block size


def quantizable(name: str, module: nn.Module, head: tuple[str, ...]) -> bool:
    """Whether bitsandbytes packs this module's weight to 4 bits: a linear layer outside the
    task head and outside what PEFT adds or keeps trainable."""
    return isinstance(module, nn.Linear) and not any(name == h or name.startswith(h + ".") for h in head) \
        and "lora_" not in name and "modules_to_save" not in name and "original_module" not in name


def weight_bytes(model: nn.Module, quantized: bool, dtype_bytes: int, double_quant: bool) -> int:
    """Stored weights; 4-bit linear weights with their quantization constants."""
    quantized_ids = set()
    if quantized:
        head = inspect_model(unwrap_peft(model)).head_modules
        for name, module in unwrap_peft(model).named_modules():
            if quantizable(name, module, head) and hasattr(module, "weight"):
                quantized_ids.add(id(module.weight))
    total, seen = 0, set()
    for module in model.modules():
        fp32 = kept_fp32(module)
        for param in module.parameters(recurse=False):
            if id(param) in seen:  # tied (an LM head that is the embedding matrix): stored once
                continue
            seen.add(id(param))
            n = param.numel()
            if id(param) in quantized_ids:
                blocks = n / BLOCK
                constants = blocks * 1 + blocks / 256 * 4 if double_quant else blocks * 4
                total += n / 2 + constants
            else:
                total += (4 if fp32 else dtype_bytes) * n
    return int(total)


def kept_fp32(module: nn.Module) -> bool:
    """Whether `module`'s own weights stay fp32 under a half-precision base: it holds a trained
    one (`peftkit.models.keep_trainable_fp32`: trained tensors and their frozen neighbours,
    bitfit's frozen weights beside its trained biases)."""
    return any(p.requires_grad for p in module.parameters(recurse=False))


def backward_gradient_terms(model: nn.Module, accumulates: bool) -> dict[str, int]:
    """The gradients backward holds before it frees any layer's activations (those of trained
    tensors above the layers: the head, the final norm, an output layer tied to the
    embeddings, which receives its first gradient there; all of them when an earlier
    micro-batch left its gradients to be summed), and the tied tensors' contributions held
    beside their sum (autograd adds them out of place), in bytes."""
    base = unwrap_peft(model)
    anatomy = inspect_model(base)
    # an encoder-decoder's token embeddings sit outside its decoder stack, in front of it
    embeddings = {name for name, module in base.named_modules(remove_duplicate=False) if isinstance(module, nn.Embedding)}
    names: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, param in base.named_parameters(remove_duplicate=False):
        if param.requires_grad:
            names.setdefault(id(param), (param, []))[1].append(name)

    def above(name: str) -> bool:
        region = anatomy.region(name)
        return region == "head" or region == "top" and name.rpartition(".")[0] not in embeddings

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    first = trainable if accumulates else sum(p.numel() for p, ns in names.values() if any(map(above, ns)))
    # autograd adds a shared tensor's contributions out of place, one pair at a time: two copies beside the sum
    return {"gradients_at_backward_start": 4 * first,
            "tied_gradient_copies": 2 * 4 * sum(p.numel() for p, ns in names.values() if len(ns) > 1)}
