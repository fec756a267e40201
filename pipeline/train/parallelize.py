"""Build the model for training: activation checkpointing, torch.compile, FSDP2 (torchtitan's order).

The model is created on the meta device, wrapped, then materialized on the training device and
initialized in place, so no rank ever holds more than its shard plus one full parameter.
FSDP2 `fully_shard` wraps every block and then the root (embedding, final norm, output head); with
bf16 the parameters are cast for compute and gradients are reduced in fp32.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .model import Llama, LlamaConfig


def build_model(cfg: LlamaConfig, device: torch.device, world: int, seed: int, bf16: bool = False,
                activation_checkpointing: bool = False, compile: bool = False) -> Llama:
    with torch.device("meta"):
        model = Llama(cfg)
    for block in model.layers:
        block.checkpoint = activation_checkpointing
        if compile:
            block.compile(fullgraph=True)
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                              reduce_dtype=torch.float32 if bf16 else None)
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # the last block's parameters are needed again at once by backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < n - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model
