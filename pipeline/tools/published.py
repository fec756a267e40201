"""Published figures that `tinyprep plan` shows beside its estimates: the sizes of the datasets
TinyLlama trained on and TinyLlama's own data-preparation figures, each with where it was
published. A figure is a range (low, high) where sources disagree or where it is derived.

Sources (read 2026-11):
  [SP]   cerebras/SlimPajama-627B dataset card, huggingface.co/datasets/cerebras/SlimPajama-627B:
         "59166 jsonl files and is ~895GB compressed", "1210B to 627B tokens" (tokenizer not
         named), source shares by bytes (GitHub 5.2%).
  [SP6]  DKYoon/SlimPajama-6B dataset card: a 1% sample of SlimPajama-627B train (train/chunk1
         of 10 chunks, 10% of it) holds 5,489,000 rows and 23.9 GB of text; "original dataset is
         over 2TBs" decompressed.
  [SC]   bigcode/starcoderdata dataset card: "783GB of code in 86 programming languages, and
         includes 54GB GitHub Issues + 13GB Jupyter notebooks ... and 32GB of GitHub commits,
         which is approximately 250 Billion tokens" (StarCoder's tokenizer).
  [LLM]  LLM360/CrystalCoderDatasets card (Llama-derived tokenizer): SlimPajama 690B tokens,
         StarCoder data 291B tokens ("0.5 * 690 + 2 * 291").
  [TL]   jzhang38/TinyLlama README ("Combined Dataset Size: Around 950B tokens") and PRETRAIN.md
         ("The SlimPajama dataset eats 893GB diskspace and the starcoderdata takes 290GB", "The
         processed data will take 1.8T storage").
  [TL146] jzhang38/TinyLlama issue #146, a maintainer on prepare_slimpajama.py (read, tokenize,
         write SlimPajama train): "When we use 128 cores, it seems to take about a day".
"""

from __future__ import annotations

from ..recipe import SourceConfig

GITHUB_SET = "RedPajamaGithub"
GITHUB_SHARE = 0.052  # [SP]: GitHub's share of SlimPajama's bytes

_SLIMPAJAMA = {
    "dataset": "SlimPajama-627B train",
    "files": 59166,  # [SP], train, validation and test
    "input_bytes": (893e9, 895e9, "[SP] ~895 GB compressed; [TL] 893 GB on disk"),
    "text_bytes": (2.0e12, 2.39e12, "[SP6] 'over 2TBs'; 23.9 GB in its 1% sample x 100"),
    "documents": (0.5e9, 0.6e9, "[SP6] 5,489,000 rows in its 1% sample x 100 (chunks are not equal: +-10%)"),
    "tokens": (627e9, 690e9, "[SP] 627B (tokenizer not named); [LLM] 690B with a Llama tokenizer"),
}
_SLIMPAJAMA_NO_GITHUB = {
    "dataset": "SlimPajama-627B train without RedPajamaGithub",
    "tokens": (594e9, 659e9, "[SP] 627B x (1 - 5.2% GitHub) = 594B; [TL] ~950B combined - [LLM] 291B "
                             "Starcoderdata = 659B; [LLM] 690B x 0.948 = 654B"),
}
_STARCODERDATA = {
    "dataset": "Starcoderdata",
    "input_bytes": (290e9, 290e9, "[TL] 290 GB on disk"),
    "text_bytes": (882e9, 882e9, "[SC] 783 + 54 + 13 + 32 GB"),
    "documents": None,
    "tokens": (250e9, 291e9, "[SC] ~250B (StarCoder tokenizer); [LLM] 291B with a Llama tokenizer"),
}

TINYLLAMA = {
    "combined_tokens": (950e9, "[TL] README: around 950B tokens (SlimPajama without GitHub + Starcoderdata)"),
    "shards_bytes": (1.8e12, "[TL] PRETRAIN.md: the processed data takes 1.8T"),
    "slimpajama_prepare_core_hours": (24 * 128, "[TL146] about a day on 128 cores to prepare SlimPajama "
                                                "train (read, tokenize, write): ~3,072 core-hours"),
}

REFERENCES = {
    "SP": "huggingface.co/datasets/cerebras/SlimPajama-627B (dataset card)",
    "SP6": "huggingface.co/datasets/DKYoon/SlimPajama-6B (dataset card)",
    "SC": "huggingface.co/datasets/bigcode/starcoderdata (dataset card)",
    "LLM": "huggingface.co/datasets/LLM360/CrystalCoderDatasets (dataset card)",
    "TL": "github.com/jzhang38/TinyLlama README.md and PRETRAIN.md",
    "TL146": "github.com/jzhang38/TinyLlama/issues/146",
}


def published_for(src: SourceConfig) -> dict | None:
    """The published figures of the dataset a source reads, for what its selection keeps (SlimPajama
    without RedPajamaGithub when the recipe excludes it), or None for another dataset. Ranges are
    (low, high, reference)."""
    urls = " ".join([*src.urls, src.url_list or ""]).lower()
    if "slimpajama-627b" in urls:
        excluded = {v for vals in src.select.exclude.values() for v in vals}
        if GITHUB_SET not in excluded:
            return dict(_SLIMPAJAMA)
        keep = 1 - GITHUB_SHARE
        out = {k: (v[0] * keep, v[1] * keep, v[2] + " x (1 - 5.2% GitHub)") if isinstance(v, tuple) else v
               for k, v in _SLIMPAJAMA.items() if k != "input_bytes"}
        out.update(_SLIMPAJAMA_NO_GITHUB, input_bytes=_SLIMPAJAMA["input_bytes"])
        return out
    if "starcoderdata" in urls and src.select.dirs is None:
        return dict(_STARCODERDATA)
    return None
