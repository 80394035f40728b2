"""Frozen computation done once instead of in every step, on any device.

- `features`: when only the head trains, the head's inputs for every example, computed once
  and kept on disk under a key naming everything they depend on.
- `bottom`: when every trainable parameter sits in layer K or above and nothing below K is
  stochastic, layer K-1's output for every example, computed once and replayed in the forward
  pass.

The classification tasks (sequence and token) use one or the other when `cache_features` is
on; neither changes what is learned. They are not CPU patches: a GPU run skips the same work.
This package imports nothing itself: both modules need torch, and the trainer that uses one
imports it.
"""
