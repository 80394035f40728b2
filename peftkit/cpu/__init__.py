"""CPU speed patches: what torch or the C library does slowly or wastefully on a CPU, replaced
for a training run on one (`run` applies each when the run is on the CPU).

- `allocator`: glibc's mmap threshold fixed, so that resident memory follows the memory in
  use instead of growing with heap fragments (`cpu_mmap_threshold_kb`).
- `dropout`: dropout masks from numpy's PCG64, several times faster than torch's CPU
  generator, seeded from torch's so that seeds and resumed runs decide them (`fast_cpu_dropout`).
- `attention`: SDPA computed in fp32 under bf16/fp16 autocast, where torch's CPU kernels are
  several times faster than in half precision (`attn_implementation: auto`).

They live together because they are one kind of thing: each changes how fast a CPU run goes
or how much memory it holds, not what it computes (dropout keeps its rate and scale, its masks
drawn by another generator), and each leaves other devices alone. This package imports
nothing itself: `allocator` needs only ctypes, the other two torch, and whoever applies one
imports it.
"""
