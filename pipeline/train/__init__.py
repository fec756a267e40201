"""The bundled trainer: a Llama under FSDP2 that streams a run's mixture (`tinyprep train`).

One job per module (torchtitan's layout):

    model.py        Llama (RMSNorm, RoPE, SwiGLU, grouped-query attention), configs, TinyLlama init
    parallelize.py  meta-device build, activation checkpointing, torch.compile, FSDP2 fully_shard
    permutation.py  keyed Feistel bijection of [0, n): a fresh shuffle per source and epoch
    mixing.py       exact per-batch source counts (a periodic Pfair table) and in-batch order
    shards.py       token windows of a source's stream over its shards (pread, per-shard offsets)
    loader.py       the global sample stream, each rank's slice, resume state and the plan it is
                    a position in (plan_record / plan_changes); the prefetch thread; the holdout
                    set; every batch's token ids checked (vocabulary, all-zero windows)
    preflight.py    before any rank starts: the recipe's mix settings against mixture.json, every
                    shard's files against manifest.json
    schedule.py     warmup + cosine learning rate
    checkpoint.py   DCP checkpoints (model, optimizer, loader position, RNG, the plan trained on);
                    the newest usable one; refusing a resume on another plan
    metrics.py      metrics.jsonl and console lines, MFU
    distributed.py  process groups and launching ranks (or joining torchrun's)
    trainer.py      prepare, launch, the training loop, validation
    export.py       a checkpoint as a Hugging Face Llama (`tinyprep export-model`): DCP read in one
                    process, names, RoPE layout, config, safetensors, the run's tokenizer

Runs of synthetic tokens for its tests and the loader benchmark are built by tests/synthetic.py.
"""
