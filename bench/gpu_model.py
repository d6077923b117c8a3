"""Random-init, real-shaped NF4 models for the GPU benchmarks, built layer by layer: no download, and never more than
one decoder layer in bf16 at a time (a 70B model in bf16 does not fit one GPU; its NF4 form does)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "model_configs"
INIT_STD = 0.02


def shipped_config(name: str, **overrides):
    """A config from recipes/model_configs (e.g. "Llama-3.1-8B-Instruct"), fields overridden (tiny test shapes)."""
    config = AutoConfig.from_pretrained(CONFIGS / name)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_random_nf4(config, device: torch.device, attn_implementation: str = "sdpa",
                     compute_dtype: torch.dtype = torch.bfloat16, quant_storage: torch.dtype = torch.uint8,
                     seed: int = 0, on_layer: Callable[[int, torch.nn.Module], None] | None = None):
    """The model of `config` with random weights (normal, std 0.02; norms 1), every Linear inside the decoder layers
    an NF4 double-quant `bnb.nn.Linear4bit` computing in `compute_dtype`, as `from_pretrained` with a
    BitsAndBytesConfig would give; embeddings, norms and lm_head stay in bf16 (also as there).

    The skeleton is built on the meta device; then each decoder layer in turn gets bf16 weights on `device`, its
    Linears are quantized and the bf16 copies freed. `on_layer(i, model)` runs after layer i is done.
    """
    import bitsandbytes as bnb

    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn_implementation)
    inner = model.get_decoder()
    for module in (inner.embed_tokens, inner.norm, model.lm_head):
        module.to_empty(device=device)
        _init(module, generator)
    inner.rotary_emb = type(inner.rotary_emb)(model.config).to(device)  # computed buffers, not random ones
    for i, layer in enumerate(inner.layers):
        layer.to_empty(device=device)
        _init(layer, generator)
        for name, linear in [(n, m) for n, m in layer.named_modules() if type(m) is torch.nn.Linear]:
            quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                          quant_storage=quant_storage, device="meta")
            # module=: quantizing also records the state on the module, from which Linear4bit recovers it when
            # FSDP2 has swapped the parameter for a DTensor (as from_pretrained's loading does).
            quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4", quant_storage=quant_storage,
                                                 module=quantized).to(device)
            if linear.bias is not None:
                quantized.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            parent_name, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, child, quantized)
            del linear
        if on_layer is not None:
            on_layer(i, model)
    # What peft's kbit preparation and TRL look for to treat the model as 4-bit loaded.
    model.is_loaded_in_4bit = True
    return model


@torch.no_grad()
def _init(module: torch.nn.Module, generator: torch.Generator) -> None:
    for name, param in module.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1:  # RMSNorm weights
            param.fill_(1.0)
        else:
            param.normal_(0.0, INIT_STD, generator=generator)
