"""Run by tests/test_distributed.py under `accelerate launch`: trains one run with
`peftkit.train` and saves the trainable tensors this rank's model holds at the end
(DUMP/rank<N>.safetensors), so the test can compare every rank with what rank 0 saved.

usage: accelerate launch ... tests/ddp_worker.py CONFIG_JSON DUMP_DIR"""

from __future__ import annotations

import json
import os
import sys

from safetensors.torch import save_file

import peftkit
import peftkit.run

held = {}
ready_for_training = peftkit.run.ready_for_training


def holding(model, **options):
    """peftkit.run applies this to the model it trains: keep a reference to it."""
    held["model"] = ready_for_training(model, **options)
    return held["model"]


peftkit.run.ready_for_training = holding
result = peftkit.train(json.loads(sys.argv[1]))
trained = {n: p.detach().contiguous() for n, p in held["model"].named_parameters() if p.requires_grad}
save_file(trained, os.path.join(sys.argv[2], f"rank{os.environ.get('RANK', '0')}.safetensors"))
with open(os.path.join(sys.argv[2], f"record{os.environ.get('RANK', '0')}.json"), "w") as f:
    json.dump({"metrics": result.metrics, "processes": result.record.processes}, f)
