"""Build the model a recipe describes: tokenizer, dtype, attention backend, optional NF4 quantization, LoRA adapter."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from multitune.compat import keep_4bit_weights_differentiable, quantize_on_meta
from multitune.recipes.errors import InputError
from multitune.recipes.schema import AdapterConfig, ModelConfig
from multitune.trainer.model_source import resolve_model_path

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


def check_adapter_folder(adapter: Path) -> None:
    """An adapter we are about to load: PEFT config plus safetensors weights (a pickled .bin could run code)."""
    if not (adapter / "adapter_config.json").is_file():
        raise InputError(f"--adapter {adapter}: not an adapter folder (no adapter_config.json)")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise InputError(f"--adapter {adapter}: no adapter_model.safetensors (adapters are loaded from safetensors "
                         f"only, never from pickled .bin files)")


def load_tokenizer(config: ModelConfig, local_files_only: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config), trust_remote_code=config.trust_remote_code,
                                              local_files_only=local_files_only)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise InputError(f"model.name_or_path: tokenizer of {config.name_or_path} has no chat template")
    return tokenizer


def tokenizer_for_check(config: ModelConfig):
    """The recipe's tokenizer if it is here without downloading or building anything (a debug model not built yet
    gives the tokenizer it will have), else None: for `multitune validate`."""
    path = Path(config.name_or_path)
    if config.tiny is not None and not path.exists():
        import tempfile

        from multitune.trainer.tiny_model import build_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            return build_tokenizer(Path(tmp))
    if not path.exists() and config.name_or_path.startswith((".", "/", "~")):
        raise InputError(f"model.name_or_path: folder not found: {config.name_or_path}")
    try:
        return load_tokenizer(config.model_copy(update={"tiny": None}), local_files_only=True)
    except OSError:  # a hub id not in the local cache
        return None


def attention_backend(requested: str) -> str:
    if requested == "flash_attention_2" and (
        not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None
    ):
        log.warning("flash_attention_2 needs a CUDA GPU and the flash-attn package; falling back to sdpa")
        return "sdpa"
    return requested


def load_model(config: ModelConfig, adapter: AdapterConfig, device: torch.device, gradient_checkpointing: bool,
               weights: bool = True, body_only: bool = False, freeze: bool = False):
    """A trainable model on `device`: base weights (maybe NF4), then LoRA (only adapter weights train) or full FT.

    The one loader of a pretrained base, for every task. body_only=True loads the decoder body without its LM head
    (`AutoModel`: hidden states out, fed `inputs_embeds` by the process-monitoring input layer) instead of the
    causal LM (`AutoModelForCausalLM`). freeze=True (without LoRA) leaves every base weight frozen.
    weights=False builds the same model on the meta device from the config alone, reading no weights and
    allocating nothing: for ranks that receive their shard from rank 0 after sharding (`shard_fsdp2`). Under NF4
    that is the 4-bit model's structure: `Linear4bit` layers whose packed weights and quantization state have the
    shapes quantizing gives (see `quantize_on_meta`), their values to come from rank 0.
    """
    auto = AutoModel if body_only else AutoModelForCausalLM
    kwargs: dict = {
        "dtype": DTYPES[config.dtype],
        "attn_implementation": attention_backend(config.attn_implementation),
        "trust_remote_code": config.trust_remote_code,
    }
    if not weights:
        path = resolve_model_path(config)
        with torch.device("meta"):
            model = auto.from_config(AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code),
                                     **kwargs)
        if config.quantization == "nf4":
            quantize_on_meta(model, bnb_config(config), DTYPES[config.dtype])
    else:
        if config.quantization == "nf4":
            kwargs["quantization_config"] = bnb_config(config)
            kwargs["device_map"] = {"": device}
        model = auto.from_pretrained(resolve_model_path(config), use_safetensors=True, **kwargs)
    model = prepare_for_training(model, config.quantization == "nf4", adapter, gradient_checkpointing,
                                 task_type=None if body_only else "CAUSAL_LM")
    if freeze and adapter.kind != "lora":
        model.requires_grad_(False)
    return model if config.quantization == "nf4" or not weights else model.to(device)


def prepare_for_training(model, quantized: bool, adapter: AdapterConfig, gradient_checkpointing: bool,
                         task_type: str | None = "CAUSAL_LM"):
    """Loaded base model → trainable: a frozen 4-bit base (non-4-bit weights upcast to fp32 where
    `keeps_fp32_outside_4bit`),
    checkpointing, no KV cache, LoRA adapter (`task_type=None` for a bare body). Also used by the GPU benchmarks on
    their layer-by-layer random NF4 models (bench/gpu_model.py)."""
    if quantized:
        keep_4bit_weights_differentiable(model)
        model.requires_grad_(False)
        if keeps_fp32_outside_4bit(model.get_input_embeddings().weight.dtype, torch.cuda.is_available()):
            upcast_outside_4bit(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    if adapter.kind == "lora":
        model = get_peft_model(model, lora_config(adapter, model, task_type))
    return model


def keeps_fp32_outside_4bit(dtype: torch.dtype, on_gpu: bool) -> bool:
    """Whether a 4-bit base of `dtype` gets its non-4-bit weights (embeddings, norms, LM head) upcast to fp32, as
    peft's `prepare_model_for_kbit_training` does for every base.

    fp16: always (its range overflows there). bf16: on a CPU-only machine, where fp32 element-wise work and
    attention are faster than bf16 (tiny model, 8 x 400-token QLoRA micro-batch, 2 cores: 1.59 s upcast vs 2.17 s
    bf16); not on a GPU machine, where bf16 is QLoRA's compute dtype and what TRL keeps: upcast, the residual
    stream, norms and attention run fp32 (8B GPU benchmark, H200, sdpa: the upcast single-GPU run peaked at 33.4
    GiB, the FSDP2 run, which casts them back to bf16, at 29.9 GiB at the same tokens/s; BENCHMARKS.md).
    """
    return dtype == torch.float16 or (dtype == torch.bfloat16 and not on_gpu)


def upcast_outside_4bit(model) -> None:
    """Every float parameter that is not a 4-bit weight to fp32, in place."""
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.float()


def bnb_config(config: ModelConfig) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=DTYPES[config.compute_dtype],
        bnb_4bit_quant_storage=DTYPES[config.quant_storage],
    )


def lora_config(adapter: AdapterConfig, model: torch.nn.Module, task_type: str | None = "CAUSAL_LM") -> LoraConfig:
    """`task_type=None` for a bare backbone (`AutoModel`, fed `inputs_embeds`) rather than a causal LM.

    `layers_to_transform` comes with the name of `model`'s decoder-layer list as peft's `layers_pattern`: without it
    peft finds the layer index only under a prefix (`model.layers.3.`), so a bare backbone (`layers.3.`) matched no
    module at all.
    """
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        layers_to_transform=adapter.layers_to_transform,
        layers_pattern=None if adapter.layers_to_transform is None else decoder_layers_name(model),
        task_type=task_type,
    )


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """`model`'s longest `nn.ModuleList`: its decoder layers (`layers` in Llama, `h` in GPT-2), however deeply wrapped
    (peft, a process-monitoring backbone).

    Raises InputError when the model has no module list.
    """
    lists = [(len(module), name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList)]
    if not lists:
        raise InputError("this model has no list of decoder layers")
    return max(lists, key=lambda entry: (entry[0], entry[1]))[2]


def decoder_layers_name(model: torch.nn.Module) -> str:
    """The attribute name of `model`'s decoder-layer list (see `decoder_layers`).

    Raises InputError (naming adapter.layers_to_transform, its one user) when the model has no module list to index.
    """
    try:
        layers = decoder_layers(model)
    except InputError:
        raise InputError("adapter.layers_to_transform: this model has no list of decoder layers to index") from None
    name = next(name for name, module in model.named_modules() if module is layers)
    return name.rsplit(".", 1)[-1]


def check_compiler(device: torch.device) -> None:
    """What `train.compile` needs on `device`, checked before any data or model work: on CPU a C++ compiler that
    compiles (`$CXX`, else g++, as inductor picks it; a one-line program must build, so a wrong CXX fails here rather
    than at the first step), on GPU the triton package.

    Raises InputError naming what is missing and how to fix it.
    """
    if device.type != "cpu":
        if importlib.util.find_spec("triton") is None:
            raise InputError(f"train.compile: torch.compile on {device.type} needs the triton package; "
                             f"install it or set train.compile: false")
        return
    cxx = os.environ.get("CXX")
    named = f"CXX={cxx}" if cxx else "g++"
    fix = "fix or unset CXX" if cxx else "install g++, or set CXX to a C++ compiler"
    path = shutil.which(cxx or "g++")
    if path is None:
        where = "does not exist" if os.sep in (cxx or "") else "is not on PATH"
        raise InputError(f"train.compile: torch.compile on CPU needs a C++ compiler and {named} {where} ({fix}); "
                         f"or set train.compile: false")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "a.out"
        try:
            subprocess.run([path, "-x", "c++", "-", "-o", str(out)], input="int main() { return 0; }\n", text=True,
                           capture_output=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if not out.is_file() or out.stat().st_size == 0:
            raise InputError(f"train.compile: {named} did not compile a one-line C++ program, so torch.compile "
                             f"cannot build its CPU kernels ({fix}); or set train.compile: false")


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """`torch.compile` each decoder layer in place (inductor, dynamic shapes); returns how many were compiled. Check
    the toolchain first (`check_compiler`).

    Layers rather than the whole model: the layers share one graph (a second one for the first layer, whose input
    needs no gradient), micro-batches of any shape reuse it, and the loss, peft's wrappers and the cache code stay
    eager. In place (`nn.Module.compile`), so parameter names, checkpoints and adapters are unchanged. What it buys
    is fused element-wise work (RMSNorm, rotary, SiLU x up, LoRA's scaling and add): SmolLM2-135M, LoRA r=16 on every
    linear layer, ~4,000-token micro-batches on 2 CPU cores: 11.66 -> 9.50 s forward + backward (-18.5%), the same
    loss to 1e-6 (BENCHMARKS.md). The first micro-batches pay the compile (~30 s on 2 cores the first time; inductor
    keeps a cache between runs). Run evaluation under `torch.compiler.set_stance("force_eager")`: generation's
    KV-cache shapes would each compile anew.

    Raises InputError when the model has no list of decoder layers.
    """
    try:
        layers = decoder_layers(model)
    except InputError:
        raise InputError("train.compile: this model has no list of decoder layers to compile "
                         "(set train.compile: false)") from None
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
