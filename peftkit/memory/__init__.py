"""The analytic memory estimate: a run's peak memory from the model's config alone (the model
built on the meta device, no weights), term by term. How each term is computed, and what it
was checked against, is docs/estimate.md.

The formulas are leaves, each importing only other formulas and the model's anatomy, so the
tasks that own an output layer call them downward:

- `sizes`: a config's dimensions under each family's names, bytes per value, virtual tokens;
- `weights`: stored weights (4-bit storage with its constants) and the gradients backward holds;
- `optimizer`: the optimizer's states per trainable tensor;
- `activations`: what one training step saves for backward, layer by layer;
- `evaluation`: the most one layer holds in a forward pass without gradients;
- `heads`: TRL's fused LM head, scored in tiles;
- `generation`: key/value caches (generation's, prefix tuning's);
- `encoder_decoder`: the layer terms of a model with two stacks (T5, BART).

Above them:

- `meta`: the transformers config and the task model on the meta device (it loads through
  `peftkit.models` and `peftkit.pooling`, a run's parts, so no formula imports it);
- `estimate`: the public API (`estimate`, `estimate_run`, `Estimate`), above the task and
  strategy registries too: it builds the model and adds the terms up.

A task importing a formula runs this file, so it imports none of its modules itself.
"""
