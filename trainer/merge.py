"""`multitune merge`: fold a LoRA adapter into a full-precision copy of its base and save a standalone model.

A QLoRA adapter was trained against the *dequantized NF4* weights, not the original ones. Merging it into the
4-bit tensors re-quantizes the sum (lossy, the known pitfall); merging onto the original weights gives a model
that differs from what was trained by the quantization error. By default we therefore dequantize the NF4 base
to the run's dtype and merge there: the merged model computes exactly what base+adapter computed in training.
`onto="original"` merges onto the unquantized checkpoint instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from recipes.errors import InputError
from trainer.model import DTYPES


def adapter_info(adapter_dir: Path) -> dict:
    if not (adapter_dir / "adapter_config.json").is_file():
        raise InputError(f"--adapter {adapter_dir}: not an adapter folder (no adapter_config.json)")
    info_file = adapter_dir / "multitune.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    info.setdefault("base_model", PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path)
    info.setdefault("quantization", "none")
    info.setdefault("dtype", "float32")
    return info


def load_base_for_merge(info: dict, base: str, onto: str) -> torch.nn.Module:
    dtype = DTYPES[info["dtype"]]
    if info["quantization"] == "nf4" and onto == "dequantized":
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=info.get("double_quant", True),
            bnb_4bit_compute_dtype=DTYPES[info.get("compute_dtype", info["dtype"])],
        )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=dtype,
                                                     device_map={"": device})
        return model.dequantize(dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(base, dtype=dtype)


def merge_adapter(adapter_dir: Path, out: Path, base: str | None = None, onto: str = "dequantized") -> Path:
    if onto not in ("dequantized", "original"):
        raise InputError(f"--onto must be dequantized or original (got {onto!r})")
    info = adapter_info(adapter_dir)
    base = base or info["base_model"]
    if out.exists():
        raise InputError(f"--out {out} already exists; choose a new folder")
    model = load_base_for_merge(info, base, onto)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(tmp)
    os.rename(tmp, out)
    return out
