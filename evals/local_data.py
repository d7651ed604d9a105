"""Loads the shipped JSONL tasks from this folder, whatever directory lm_eval is started from
(a `dataset_kwargs: data_files:` path in the yaml would be relative to the current directory)."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_modern_llm_mc(**_metadata) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(HERE / "modern_llm_mc.jsonl")})
