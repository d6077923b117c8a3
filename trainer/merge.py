"""`multitune merge`: fold a LoRA adapter into a full-precision copy of its base and save a standalone model.

A QLoRA adapter was trained against the *dequantized NF4* weights, not the original ones. Merging it into the
4-bit tensors re-quantizes the sum (lossy, the known pitfall); merging onto the original weights gives a model
that differs from what was trained by the quantization error. By default we therefore dequantize the NF4 base
to the run's dtype and merge there: the merged model computes exactly what base+adapter computed in training.
`onto="original"` merges onto the unquantized checkpoint instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from multitune.atomic import atomic_dir
from multitune.recipes.errors import InputError
from multitune.recipes.schema import ModelConfig
from multitune.trainer.adapter_base import adapter_record, check_base
from multitune.trainer.model import DTYPES, check_adapter_folder
from multitune.trainer.model_source import resolve_model_path


def adapter_info(adapter_dir: Path) -> dict:
    check_adapter_folder(adapter_dir)
    info = adapter_record(adapter_dir)
    info.setdefault("base_model", PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path)
    info.setdefault("quantization", "none")
    info.setdefault("dtype", "float32")
    return info


def base_model_path(info: dict, base: str | None = None) -> str:
    """The folder to merge onto: `base` when given, else the base the adapter was trained on (multitune.json); a
    shortcut or GGUF file resolves to its converted folder in the run's model cache, as in training."""
    return resolve_model_path(ModelConfig(name_or_path=base or info["base_model"],
                                          gguf_file=None if base else info.get("gguf_file"),
                                          cache_dir=info.get("model_cache_dir", "cache/models")))


def load_base_for_merge(info: dict, base: str, onto: str) -> torch.nn.Module:
    dtype = DTYPES[info["dtype"]]
    if info["quantization"] == "nf4" and onto == "dequantized":
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=info.get("double_quant", True),
            bnb_4bit_compute_dtype=DTYPES[info.get("compute_dtype", info["dtype"])],
        )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=dtype,
                                                     device_map={"": device}, use_safetensors=True)
        return dequantize_nf4(model, dtype)
    return AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True)


def dequantize_nf4(model, dtype: torch.dtype):
    """Replace every Linear4bit by a float Linear holding exactly the NF4 values the adapter was trained against.

    Not `model.dequantize()`: in transformers 5.23 on CPU it returned weights up to 0.6 away from bitsandbytes'
    own dequantization (measured on a tiny Llama), which breaks merge fidelity.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                     dtype=dtype, device=module.weight.device)
            with torch.no_grad():
                linear.weight.copy_(dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype))
                if module.bias is not None:
                    linear.bias.copy_(module.bias.to(dtype))
            model.set_submodule(name, linear)
    model.hf_quantizer.remove_quantization_config(model)
    return model


def merge_adapter(adapter_dir: Path, out: Path, base: str | None = None, onto: str = "dequantized") -> Path:
    if onto not in ("dequantized", "original"):
        raise InputError(f"--onto must be dequantized or original (got {onto!r})")
    info = adapter_info(adapter_dir)
    if out.exists():
        raise InputError(f"--out {out} already exists; choose a new folder")
    check_base(adapter_dir, base or info["base_model"], "--base PATH")
    base = base_model_path(info, base)
    model = load_base_for_merge(info, base, onto)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(tmp)
    return out
