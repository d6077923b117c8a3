"""`multitune plan`: per-GPU peak memory of a recipe from the model config alone (no weights), and a recommendation.

Formulas and assumptions: docs/memory.md. Every figure is bytes; printed in GiB (GPU sizes are GiB, as vendors'
"24 GB"/"80 GB" cards are).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from multitune.recipes.errors import InputError
from multitune.recipes.schema import Recipe

GIB = 1024**3
REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = REPO / "recipes" / "model_configs"
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BLOCK = 64          # bitsandbytes 4-bit block size: one absmax per 64 weights
DOUBLE_QUANT_BLOCK = 256  # double quant: the 8-bit absmax values are themselves quantized in blocks of 256
CUDA_CONTEXT = 0.75 * GIB  # CUDA context + cuBLAS/NCCL workspaces, measured 0.5-1 GB on recent drivers
PROCESS_RAM = 3 * GIB     # host memory of one training rank before any model: Python, torch, CUDA libraries
FRAGMENTATION = 1.10    # caching-allocator slack over the bytes actually allocated
SHARDS_WEIGHTS = {"fsdp", "zero3"}
SHARDS_STATE = {"fsdp", "zero2", "zero3"}


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs from a model config: layer geometry and parameter counts by kind."""

    source: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    linear_in_layers: int      # all nn.Linear weights inside the decoder layers (quantized under NF4)
    other_params: int          # embeddings, norms, biases, lm_head (never quantized)
    lm_head_params: int        # 0 when tied to the embeddings
    root_params: int           # outside the decoder layers: embeddings, final norm, lm_head
    layer_params: int          # one decoder layer, all kinds
    linear_shapes: tuple[tuple[str, int, int], ...]  # (module name, in, out) of one layer's linears

    @property
    def total_params(self) -> int:
        return self.linear_in_layers + self.other_params


@dataclass(frozen=True)
class Setup:
    """The run as the planner sees it, after recipe + command-line choices."""

    strategy: str
    gpus: int
    micro_batch_tokens: int
    gradient_checkpointing: bool
    offload_optimizer: bool = False
    offload_params: bool = False
    target_fraction: float = 1.0  # share of positions whose logits are computed (the loop keeps target columns)


@dataclass
class Plan:
    setup: Setup
    items: list[tuple[str, float, str]]  # (component, bytes per GPU, how it was computed)
    gpu_bytes: float
    host: list[tuple[str, float, str]] = dataclasses.field(default_factory=list)  # CPU RAM per node, by component
    host_peak: float = 0.0
    cpu_bytes: float | None = None  # CPU RAM per node, when given (--cpu-mem)

    @property
    def peak(self) -> float:
        return sum(b for _, b, _ in self.items)

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_bytes and (self.cpu_bytes is None or self.host_peak <= self.cpu_bytes)


# ---------------------------------------------------------------------------------------------------- shapes
def load_config(name_or_path: str, trust_remote_code: bool = False):
    """(transformers config, where it came from): a local folder, the local hub cache, or a shipped config.json."""
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), f"{path}/config.json"
    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True, trust_remote_code=trust_remote_code)
        return config, f"{name_or_path} (local Hugging Face cache)"
    except OSError:
        pass
    shipped = SHIPPED_CONFIGS / name_or_path.rstrip("/").split("/")[-1]
    if (shipped / "config.json").is_file():
        return (AutoConfig.from_pretrained(shipped),
                f"{shipped.relative_to(REPO)}/config.json (hub id {name_or_path} not available offline)")
    raise InputError(f"model.name_or_path: no config for {name_or_path}: not a local folder, not in the Hugging Face "
                     f"cache, and no recipes/model_configs/{shipped.name}/config.json")


def model_shape(config, source: str) -> ModelShape:
    """Exact parameter counts from a one-layer copy of the architecture built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    text = config.get_text_config()
    layers = text.num_hidden_layers
    one = copy.deepcopy(config)
    one.get_text_config().num_hidden_layers = 1
    for key in ("layer_types", "max_window_layers"):  # per-layer lists must shrink with the layer count
        if isinstance(getattr(one.get_text_config(), key, None), list):
            setattr(one.get_text_config(), key, getattr(one.get_text_config(), key)[:1])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(one)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    linear_in_layer, shapes, layer_total = 0, [], 0
    layer_prefix = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == 1 and name.endswith("layers"):
            layer_prefix = name + ".0."
            layer_total = sum(p.numel() for p in module[0].parameters())
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and layer_prefix and name.startswith(layer_prefix):
            linear_in_layer += module.weight.numel()
            shapes.append((name.removeprefix(layer_prefix), module.in_features, module.out_features))
    total_one = sum(p.numel() for p in model.parameters())
    other = total_one - layer_total + layers * (layer_total - linear_in_layer)
    heads = text.num_attention_heads
    return ModelShape(
        source=source, layers=layers, hidden=text.hidden_size, intermediate=text.intermediate_size, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=text.vocab_size,
        linear_in_layers=layers * linear_in_layer, other_params=other,
        lm_head_params=0 if tied or head is None else head.weight.numel(), root_params=total_one - layer_total,
        layer_params=layer_total,
        linear_shapes=tuple(shapes))


def recipe_shape(recipe: Recipe) -> ModelShape:
    from multitune.trainer.model_source import resolve_model_path

    config, source = load_config(resolve_model_path(recipe.model), recipe.model.trust_remote_code)
    return model_shape(config, source)


# ---------------------------------------------------------------------------------------------------- the estimate
def lora_targets(shape: ModelShape, target_modules) -> list[tuple[str, int, int]]:
    if target_modules == "all-linear":
        return list(shape.linear_shapes)
    return [s for s in shape.linear_shapes if s[0].split(".")[-1] in target_modules]


def estimate(recipe: Recipe, shape: ModelShape, setup: Setup, gpu_gib: float) -> Plan:
    m, a, t = recipe.model, recipe.adapter, recipe.train
    n, strategy = setup.gpus, setup.strategy
    deepspeed = strategy in ("zero2", "zero3")
    qlora = m.quantization == "nf4"
    lora = a.kind == "lora"
    model_b = BYTES[m.dtype]
    act_b = BYTES[m.compute_dtype] if qlora else model_b
    # Dtype of the frozen non-quantized weights (embeddings, norms, lm_head): fp32 where the loader upcasts them
    # (`upcasts_outside_4bit`); FSDP2 casts them back to the 4-bit storage dtype (trainer/distributed.py), DeepSpeed
    # to its bf16/fp16.
    upcasts = qlora and upcasts_outside_4bit(m.dtype)
    other_b = 4 if upcasts and strategy not in ("fsdp", "zero2", "zero3") else model_b
    weight_shard = n if strategy in SHARDS_WEIGHTS else 1
    state_shard = n if strategy in SHARDS_STATE else 1
    items: list[tuple[str, float, str]] = []

    def add(name: str, value: float, how: str) -> None:
        items.append((name, float(value), how))

    # Frozen/base weights; with ZeRO-3 parameter offload they live in CPU RAM between uses.
    w_div = weight_shard if not setup.offload_params else float("inf")
    where = " (offloaded to CPU)" if setup.offload_params else _per(weight_shard)
    if qlora:
        q = shape.linear_in_layers
        consts = q / NF4_BLOCK * (1 + 4 / DOUBLE_QUANT_BLOCK) if m.double_quant else q / NF4_BLOCK * 4
        how_c = ("8-bit absmax per 64 + fp32 per 256 absmax" if m.double_quant else "fp32 absmax per 64 weights")
        add("weights: NF4 linear layers", q * 0.5 / w_div, f"{q / 1e9:.2f}B x 0.5 B" + where)
        add("quantization constants", consts / w_div, how_c + where)
        add("weights: embeddings/norms/lm_head", shape.other_params * other_b / w_div,
            f"{shape.other_params / 1e9:.2f}B x {other_b} B" + where)
    else:
        add("weights", shape.total_params * model_b / w_div, f"{shape.total_params / 1e9:.2f}B x {model_b} B" + where)
    # Trainable parameters, their gradients and optimizer state. FSDP2's CPUOffloadPolicy keeps every shard in CPU
    # RAM, trainable ones included: gradients are reduced to CPU and the optimizer steps there.
    fsdp_offload = strategy == "fsdp" and setup.offload_params
    trainable, train_b = trainable_params(recipe, shape, strategy)
    if lora:
        add("LoRA parameters", 0.0 if fsdp_offload else trainable * train_b / weight_shard,
            f"{trainable / 1e6:.1f}M = r x (in + out) per target x {shape.layers} layers, {train_b} B" +
            (" (offloaded to CPU)" if fsdp_offload else _per(weight_shard)))
    add("gradients (trainable only)", 0.0 if fsdp_offload else trainable * train_b / state_shard,
        f"{train_b} B/param" + (" (reduced to CPU)" if fsdp_offload else _per(state_shard)))
    opt_per_param, opt_how = _optimizer_bytes(t.optimizer, train_b, deepspeed)
    offloaded = setup.offload_optimizer or fsdp_offload
    opt = 0.0 if offloaded else trainable * opt_per_param / state_shard
    add("optimizer states", opt, ("offloaded to CPU" if offloaded else opt_how + _per(state_shard)))
    # Parameters gathered whole while in use; from here on, allocations come and go every step.
    first_dynamic = len(items)
    layer_bytes = _layer_bytes(shape, m, model_b)
    if strategy == "fsdp":
        add("FSDP all-gather: root + 2 layers", shape.root_params * other_b + 2 * layer_bytes,
            "the root unit (embeddings, final norm, lm_head) stays gathered through forward+backward; "
            "current + prefetched layer")
    elif strategy == "zero3":
        add("ZeRO-3 gathered parameters", 2 * max(layer_bytes, shape.vocab * shape.hidden * other_b),
            "current + prefetched submodule (largest: a layer or the embeddings)")
    # Activations.
    tokens = setup.micro_batch_tokens
    per_layer = layer_activation_bytes(shape, recipe, act_b, train_b if lora else 0)
    if setup.gradient_checkpointing:
        acts = tokens * (shape.layers * shape.hidden * act_b + 2 * per_layer)
        how = f"{tokens} tok x ({shape.layers} layer inputs x {act_b} B x h + 2 x one layer recomputed)"
    else:
        acts = tokens * (shape.layers + 1) * per_layer
        how = f"{tokens} tok x {shape.layers} layers x {per_layer / 1024:.1f} KiB/tok/layer (+1 layer of grads)"
    add("activations" + (" (checkpointed)" if setup.gradient_checkpointing else ""), acts, how)
    kept = tokens * setup.target_fraction
    logit_b = other_b if qlora else model_b
    from multitune.data_prep.tasks import get_task

    if get_task(recipe.task).workload != "chat":  # heads over the last hidden states: no vocabulary logits
        add("logits + loss", 0.0, f"{recipe.task}: task heads over the last hidden states, no vocabulary logits")
    else:
        add("logits + loss", kept * shape.vocab * (logit_b + 8),
            f"{kept:.0f} positions x vocab {shape.vocab} x ({logit_b} B logits + 4 B fp32 log-softmax + 4 B grad)")
    if qlora:
        add("dequantized weight (transient)", max(i * o for _, i, o in shape.linear_shapes) * BYTES[m.compute_dtype],
            "bitsandbytes dequantizes one linear weight at a time")
    dynamic = sum(b for _, b, _ in items[first_dynamic:])
    add("allocator fragmentation", dynamic * (FRAGMENTATION - 1),
        f"{FRAGMENTATION - 1:.0%} of the per-step allocations above (gathers, activations, logits)")
    add("CUDA context + workspaces", CUDA_CONTEXT, "fixed")
    return Plan(setup, items, gpu_gib * GIB)


def trainable_params(recipe: Recipe, shape: ModelShape, strategy: str) -> tuple[int, int]:
    """(trainable parameters, their bytes each): LoRA's r x (in + out) per target and layer, fp32 as peft keeps
    them (the model dtype under DeepSpeed, which casts the module); full fine-tuning trains every weight."""
    if recipe.adapter.kind != "lora":
        return shape.total_params, BYTES[recipe.model.dtype]
    a = recipe.adapter
    trainable = shape.layers * sum(a.r * (i + o) for _, i, o in lora_targets(shape, a.target_modules))
    return trainable, BYTES[recipe.model.dtype] if strategy in ("zero2", "zero3") else 4


def host_memory(recipe: Recipe, shape: ModelShape, setup: Setup, gpus_per_node: int) -> tuple[list, float]:
    """CPU RAM per node: (items of (component, bytes, how), peak bytes). Steady state: what offload keeps in RAM for
    this node's ranks (parameter shards, gradients and optimizer states under FSDP2 offload; parameters and/or
    optimizer states under ZeRO-3 offload) plus each rank's process. Loading: what ranks hold until sharding is
    done (docs/memory.md, *CPU RAM while loading*): FSDP2 (full, LoRA and QLoRA) reads (QLoRA: quantizes) the
    model on rank 0 only, which keeps it until every shard is sent, and every rank allocates its shard; ZeRO-3
    partitions full/LoRA while loading; otherwise every rank loads (QLoRA: quantizes) the whole model. The peak is
    the larger of the two."""
    m, n = recipe.model, setup.gpus
    ranks = min(gpus_per_node, n)
    share = ranks / n  # this node's part of what is sharded over all ranks
    qlora = m.quantization == "nf4"
    model_b = BYTES[m.dtype]
    if qlora:
        q = shape.linear_in_layers
        consts = q / NF4_BLOCK * (1 + 4 / DOUBLE_QUANT_BLOCK) if m.double_quant else q / NF4_BLOCK * 4
        model_bytes = q * 0.5 + consts + shape.other_params * model_b
    else:
        model_bytes = shape.total_params * model_b
    trainable, train_b = trainable_params(recipe, shape, setup.strategy)
    opt_per_param, _ = _optimizer_bytes(recipe.train.optimizer, train_b, setup.strategy in ("zero2", "zero3"))
    items: list[tuple[str, float, str]] = []
    if setup.offload_params:
        items.append(("offloaded parameter shards", model_bytes * share,
                      f"the model's {model_bytes / GIB:.1f} GiB x {ranks}/{n} ranks on this node"))
    if setup.strategy == "fsdp" and setup.offload_params:
        items.append(("offloaded trainable state", trainable * (2 * train_b + opt_per_param) * share,
                      f"{trainable / 1e6:.1f}M trainable x ({train_b} B param + {train_b} B grad + "
                      f"{opt_per_param:g} B optimizer) x {ranks}/{n}"))
    elif setup.offload_optimizer:
        items.append(("offloaded optimizer states", trainable * opt_per_param * share,
                      f"{trainable / 1e6:.1f}M trainable x {opt_per_param:g} B x {ranks}/{n}"))
    items.append(("rank processes", ranks * PROCESS_RAM, f"{ranks} x {PROCESS_RAM / GIB:g} GiB (Python, torch, "
                                                        "CUDA libraries; assumed)"))
    steady = sum(b for _, b, _ in items)
    what = f"the {'4-bit ' if qlora else ''}model ({model_bytes / GIB:.1f} GiB)"
    if setup.strategy == "fsdp" and n > 1:
        # an fp16 4-bit base has rank 0's embeddings/norms/lm_head upcast to fp32 until sharding casts them back;
        # the other ranks receive one whole tensor at a time (the largest: the embeddings) beside their shard
        upcast = shape.other_params * (4 - model_b) if qlora and upcasts_outside_4bit(m.dtype) else 0.0
        in_flight = shape.vocab * shape.hidden * model_b
        loading = model_bytes + upcast + ranks * model_bytes / n + (ranks - 1) * in_flight
        how = f"rank 0 {'quantizes' if qlora else 'reads'} {what}" + (
            f" (+{upcast / GIB:.1f} GiB fp32 upcast)" if upcast else "") + f" + {ranks} x a 1/{n} shard + " \
            f"{ranks - 1} x the embeddings in flight"
    elif setup.strategy == "zero3" and not qlora:
        loading, how = model_bytes * share, "zero.Init: each rank 1/N while loading"
    else:
        loading, how = ranks * model_bytes, f"{ranks} ranks x {what} each"
    loading += ranks * PROCESS_RAM
    items.append(("while loading (before sharding)", loading, how + " + processes"))
    return items, max(steady, loading)


def upcasts_outside_4bit(dtype: str) -> bool:
    """Whether a 4-bit base of `dtype` (a recipe's `model.dtype`) trains with fp32 embeddings/norms/lm_head on the
    GPUs the planner plans for: the loader's own rule (trainer/model.py: keeps_fp32_outside_4bit)."""
    from multitune.trainer.model import DTYPES, keeps_fp32_outside_4bit

    return keeps_fp32_outside_4bit(DTYPES[dtype], on_gpu=True)


def layer_activation_bytes(shape: ModelShape, recipe: Recipe, act_b: int, lora_b: int) -> float:
    """Bytes saved for backward per token in one Llama-style decoder layer (flash/sdpa attention: no L x L term).

    2 RMSNorms (fp32 input copy + output) + q, k, v, attention output, o_proj input + gate, up, silu(gate),
    gate*up, fp32 log-sum-exp per head; each LoRA target saves its (dropped-out) input in the adapter dtype plus a
    1-byte dropout mask.
    """
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    q = shape.heads * shape.head_dim
    norms = 2 * (4 * h + act_b * h)
    attention = act_b * (q + 2 * kv + 2 * q) + 4 * shape.heads
    mlp = act_b * 4 * shape.intermediate
    lora = 0
    if lora_b:
        mask = 1 if recipe.adapter.dropout > 0 else 0
        lora = sum(i * (lora_b + mask) for _, i, _ in lora_targets(shape, recipe.adapter.target_modules))
    return norms + attention + mlp + lora


def _layer_bytes(shape: ModelShape, m, model_b: int) -> float:
    per_layer_linear = shape.linear_in_layers / shape.layers
    if m.quantization == "nf4":
        return per_layer_linear * (0.5 + 1 / NF4_BLOCK) + (shape.layer_params - per_layer_linear) * model_b
    return shape.layer_params * model_b


def _optimizer_bytes(optimizer: str, param_b: int, deepspeed: bool) -> tuple[float, str]:
    master = 4 if deepspeed and param_b < 4 else 0  # DeepSpeed bf16/fp16 keeps an fp32 master copy
    extra = f" + {master} B fp32 master" if master else ""
    if optimizer == "adamw":
        states = 2 * (4 if deepspeed else param_b)
        return states + master, f"AdamW: 2 states x {states // 2} B{extra}"
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return 2 + 2 * 4 / 256 + master, f"8-bit AdamW: 2 x 1 B + block constants{extra}"
    return master, "SGD without momentum: no state" + extra


def _per(shards: int) -> str:
    return f" / {shards} GPUs" if shards > 1 else ""


# ---------------------------------------------------------------------------------------------------- recommend
def offload_flags(recipe: Recipe) -> tuple[bool, bool]:
    """(optimizer offloaded, parameters offloaded) from the recipe and its accelerate config: DeepSpeed's
    offload devices, or FSDP2's parameter offload (which takes gradients and optimizer states along)."""
    from multitune.recipes.accelerate_config import deepspeed_settings, fsdp_offload_params

    settings = deepspeed_settings(recipe)
    if settings:
        return settings.offload_optimizer, settings.offload_param
    return False, fsdp_offload_params(recipe)


def recommend(recipe: Recipe, shape: ModelShape, setup: Setup, gpu_gib: float) -> tuple[Setup, Plan] | None:
    """The first setup that fits, trying the cheapest changes first: checkpointing, shorter micro-batches
    (down to max_seq_len), sharding, then ZeRO-3 with CPU offload."""
    strategies = [setup.strategy]
    if setup.gpus > 1:
        strategies += [s for s in ("zero2", "fsdp", "zero3") if s not in strategies]
        if recipe.model.quantization == "nf4" and recipe.model.quant_storage != recipe.model.dtype:
            strategies = [s for s in strategies if s not in SHARDS_WEIGHTS or s == setup.strategy]
    tokens = [setup.micro_batch_tokens]
    while tokens[-1] // 2 >= recipe.data.max_seq_len:
        tokens.append(tokens[-1] // 2)
    candidates = [dataclasses.replace(setup, strategy=s, gradient_checkpointing=gc, micro_batch_tokens=tok)
                  for s in strategies for gc in (setup.gradient_checkpointing, True) for tok in tokens]
    if "fsdp" in strategies:  # FSDP2 with CPU offload before leaving FSDP (fsdp_qlora_offload.yaml)
        candidates += [dataclasses.replace(setup, strategy="fsdp", gradient_checkpointing=True, micro_batch_tokens=tok,
                                           offload_params=True) for tok in tokens]
    if setup.gpus > 1 or setup.strategy == "single":
        candidates += [dataclasses.replace(setup, strategy="zero3" if setup.gpus > 1 else setup.strategy,
                                           gradient_checkpointing=True, micro_batch_tokens=tok,
                                           offload_optimizer=True, offload_params=setup.gpus > 1)
                       for tok in tokens]
    for candidate in candidates:
        plan = estimate(recipe, shape, candidate, gpu_gib)
        if plan.fits:
            return candidate, plan
    return None


def render(recipe: Recipe, shape: ModelShape, plan: Plan, advice: tuple[Setup, Plan] | None) -> str:
    s = plan.setup
    method = "QLoRA (NF4)" if recipe.model.quantization == "nf4" else ("LoRA" if recipe.adapter.kind == "lora"
                                                                      else "full fine-tuning")
    lines = [
        f"model: {recipe.model.name_or_path}: {shape.total_params / 1e9:.2f}B parameters, {shape.layers} layers, "
        f"hidden {shape.hidden}, vocab {shape.vocab}",
        f"  shapes from {shape.source}",
        f"setup: {method}, {s.strategy} on {s.gpus} x {plan.gpu_bytes / GIB:g} GiB, micro_batch_tokens "
        f"{s.micro_batch_tokens}, gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}"
        + (", optimizer offloaded" if s.offload_optimizer else "") + (", params offloaded" if s.offload_params else ""),
        "",
        f"{'per-GPU peak estimate':<36} {'GiB':>8}  how",
    ]
    lines += [f"  {name:<34} {b / GIB:8.2f}  {how}" for name, b, how in plan.items]
    lines.append(f"  {'total':<34} {plan.peak / GIB:8.2f}  of {plan.gpu_bytes / GIB:g} GiB")
    other = dataclasses.replace(s, gradient_checkpointing=not s.gradient_checkpointing)
    alt = estimate(recipe, shape, other, plan.gpu_bytes / GIB)
    lines.append(f"  (gradient checkpointing {'on' if other.gradient_checkpointing else 'off'}: "
                 f"{alt.peak / GIB:.2f} GiB)")
    lines.append("")
    lines.append(f"{'CPU RAM per node':<36} {'GiB':>8}  how")
    lines += [f"  {name:<34} {b / GIB:8.2f}  {how}" for name, b, how in plan.host]
    of = f" of {plan.cpu_bytes / GIB:g} GiB" if plan.cpu_bytes is not None else " (give --cpu-mem to check it)"
    lines.append(f"  {'peak':<34} {plan.host_peak / GIB:8.2f}{of}")
    lines.append("")
    cpu_short = plan.cpu_bytes is not None and plan.host_peak > plan.cpu_bytes
    if plan.fits:
        lines.append(f"verdict: FITS ({(plan.gpu_bytes - plan.peak) / GIB:.1f} GiB headroom per GPU)")
    elif cpu_short and plan.peak <= plan.gpu_bytes:
        lines.append(f"verdict: DOES NOT FIT in CPU RAM (short by {(plan.host_peak - plan.cpu_bytes) / GIB:.1f} GiB "
                     "per node; the GPUs would hold it)")
    else:
        lines.append(f"verdict: DOES NOT FIT (short by {(plan.peak - plan.gpu_bytes) / GIB:.1f} GiB per GPU)")
        if advice is None:
            lines.append("recommendation: no setup on these GPUs fits; use more or larger GPUs")
        else:
            a, p = advice
            offload = " with zero3_offload.yaml (optimizer" + (" + parameters" if a.offload_params else "") + \
                " in CPU RAM)" if a.offload_optimizer else ""
            if a.strategy == "fsdp" and a.offload_params:
                offload = " distributed.offload_params=true (FSDP2 CPU offload: fsdp_qlora_offload.yaml)"
            lines.append(f"recommendation: distributed.strategy={a.strategy}{offload} "
                         f"train.micro_batch_tokens={a.micro_batch_tokens} "
                         f"train.gradient_checkpointing={str(a.gradient_checkpointing).lower()} "
                         f"-> {p.peak / GIB:.2f} GiB per GPU")
    return "\n".join(lines)


def plan_recipe(recipe: Recipe, gpus: int, gpu_gib: float, target_fraction: float = 1.0,
                gpus_per_node: int | None = None, cpu_gib: float | None = None) -> tuple[Plan, str]:
    """The estimate for the recipe as written on `gpus` x `gpu_gib` (`gpus_per_node` per machine, default all on
    one up to 8), with CPU RAM per node beside it (checked against `cpu_gib` when given), and the printed report."""
    if gpus < 1 or gpu_gib <= 0:
        raise InputError("--gpus must be at least 1 and --gpu-mem positive")
    if not 0 < target_fraction <= 1:
        raise InputError("--target-fraction must be in (0, 1]")
    if (gpus_per_node is not None and gpus_per_node < 1) or (cpu_gib is not None and cpu_gib <= 0):
        raise InputError("--gpus-per-node must be at least 1 and --cpu-mem positive")
    strategy = recipe.distributed.strategy
    if gpus > 1 and strategy == "single":
        strategy = "ddp"
    offload_opt, offload_params = offload_flags(recipe)
    setup = Setup(strategy, gpus, recipe.train.micro_batch_tokens, recipe.train.gradient_checkpointing,
                  offload_opt, offload_params, target_fraction)
    shape = recipe_shape(recipe)
    plan = estimate(recipe, shape, setup, gpu_gib)
    plan.host, plan.host_peak = host_memory(recipe, shape, setup, gpus_per_node or min(gpus, 8))
    plan.cpu_bytes = cpu_gib * GIB if cpu_gib is not None else None
    advice = None if plan.peak <= plan.gpu_bytes else recommend(recipe, shape, setup, gpu_gib)
    return plan, render(recipe, shape, plan, advice)
