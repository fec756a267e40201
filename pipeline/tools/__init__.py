"""Read-only tools over a run or a recipe: they read, check and convert; they never run a stage.

    verify.py    `tinyprep verify`: shards, tokenizer and mixture against the manifest
    export.py    `tinyprep export`: LITPKDS chunks that TinyLlama's own loader reads
    inspect.py   `tinyprep inspect`: random documents decoded from shards or chunks
    plan.py      `tinyprep plan`: sizes, tokens, core-hours, wall time and disk of a recipe
"""
