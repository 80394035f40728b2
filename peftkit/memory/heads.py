"""TRL's fused LM head (`add_fused_lm_head`), which an instruction-tuned causal LM scores its
labels through (`tasks.sft`): log-probabilities computed in tiles, never the whole logits.
Torch-free: a task imports it at start-up."""

from __future__ import annotations

from typing import Any

LOGPROB_TOKEN_CHUNK, LOGPROB_VOCAB_CHUNK = 4096, 32768  # TRL's chunked log-prob tiles (trl.kernels.chunked_logprob)
# tile-sized fp32 tensors alive at once when torch folds a tile (fused_lm_head_bytes); the bool target mask counts 1/4
LM_HEAD_FORWARD_BUFFERS, LM_HEAD_BACKWARD_BUFFERS = 4, 8.25


def fused_lm_head_bytes(config: Any, scored: int, device: str, backward: bool, bytes_per_value: int = 4) -> int:
    """The fused head's memory for the `scored` positions only: those with a label (peftkit
    makes TRL skip the others on CPU too, `tasks.sft.score_answer_positions_only`), whose
    final hidden states are gathered and kept for backward, in tiles of up to 4,096 tokens x
    32,768 vocabulary entries. On a GPU, Triton kernels fold each tile in place: one tile
    buffer in the compute dtype (`bytes_per_value`), and in backward the fp32 gradient of the
    hidden states. Without Triton (CPU) the tile is folded by torch operations: forward keeps
    the tile, the scaled logits, and the exponentials with their product with the logits
    (`LM_HEAD_FORWARD_BUFFERS`); backward the tile, the logits scaled twice (temperature and
    logit scale, each a new tensor), the log-probabilities, the probabilities, the gradient,
    the bool target mask and the two temporaries of `grad += g * (is_target.float() - p)`
    (`LM_HEAD_BACKWARD_BUFFERS`; trl.kernels.chunked_logprob._backward_tile)."""
    rows = min(scored, LOGPROB_TOKEN_CHUNK)
    if device == "cuda":  # the buffer is allocated 32,768 wide whatever the vocabulary
        return int(rows * LOGPROB_VOCAB_CHUNK * bytes_per_value
                   + scored * config.hidden_size * (bytes_per_value + (4 if backward else 0)))
    buffers = LM_HEAD_BACKWARD_BUFFERS if backward else LM_HEAD_FORWARD_BUFFERS
    return int(rows * min(config.vocab_size, LOGPROB_VOCAB_CHUNK) * 4 * buffers + scored * config.hidden_size * 4)
