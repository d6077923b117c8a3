"""The accelerate config a recipe launches with: found, read and checked against the recipe at validate time, so a
strategy/method/config combination the trainer cannot run fails before any launch, with a one-line reason."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import yaml

from multitune.recipes.errors import InputError

REPO = Path(__file__).resolve().parents[1]
EXPECTED_TYPE = {"single": "NO", "ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}

# FSDP: the trainer shards with torch's FSDP2 `fully_shard` itself (trainer/distributed.py), so only the settings
# it applies are accepted; anything else would be silently ignored. key -> (accepted values, why).
FSDP2_SETTINGS = {
    "fsdp_version": ({2}, "multitune shards with FSDP2 (fully_shard); set fsdp_version: 2"),
    "fsdp_auto_wrap_policy": ({"TRANSFORMER_BASED_WRAP"}, "FSDP2 units are the model's decoder layers "
                                                          "(TRANSFORMER_BASED_WRAP)"),
    "fsdp_reshard_after_forward": ({True}, "the trainer always frees gathered layers after forward"),
    "fsdp_state_dict_type": ({"SHARDED_STATE_DICT"}, "resume checkpoints are always written sharded, per rank; "
                                                     "the adapter is gathered once at the end"),
    "fsdp_cpu_ram_efficient_loading": ({True, False}, ""),
    # torch's CPUOffloadPolicy: sharded parameters, gradients and optimizer states in CPU RAM (trainer/distributed.py).
    "fsdp_offload_params": ({True, False}, ""),
    "fsdp_activation_checkpointing": ({False}, "use train.gradient_checkpointing instead"),
}
FSDP1_ONLY = {
    "fsdp_sharding_strategy": "FSDP2 has no sharding strategies (use fsdp_reshard_after_forward)",
    "fsdp_backward_prefetch": "FSDP2 prefetches on its own",
    "fsdp_forward_prefetch": "FSDP2 prefetches on its own",
    "fsdp_use_orig_params": "FSDP2 always keeps the original parameters",
    "fsdp_sync_module_states": "rank 0 broadcasts the weights anyway (see docs/distributed.md)",
    "fsdp_min_num_params": "size-based wrapping is FSDP1; FSDP2 units are decoder layers",
    "fsdp_transformer_layer_cls_to_wrap": "units are the model's own _no_split_modules",
}
DEEPSPEED_KEYS = {
    "deepspeed_multinode_launcher", "deepspeed_hostfile", "deepspeed_inclusion_filter", "deepspeed_exclusion_filter",
    "zero_stage", "offload_optimizer_device", "offload_param_device", "zero3_init_flag", "zero3_save_16bit_model",
}
DEEPSPEED_FROM_RECIPE = {
    "gradient_accumulation_steps": "comes from train.grad_accum",
    "gradient_clipping": "comes from train.max_grad_norm",
    "deepspeed_config_file": "the trainer builds the DeepSpeed config from the recipe and these keys; a JSON file "
                             "would conflict with it",
}


def default_config(strategy: str, quantization: str) -> str:
    if strategy == "fsdp" and quantization == "nf4":
        return "fsdp_qlora.yaml"
    return {"single": "single_gpu.yaml"}.get(strategy, f"{strategy}.yaml")


def resolve_accelerate_config(recipe) -> Path:
    """The recipe's `distributed.accelerate_config` (relative to the working dir, else to the repo), or the
    strategy's default in accelerate_configs/, checked against the recipe."""
    name = recipe.distributed.accelerate_config or str(
        Path("accelerate_configs") / default_config(recipe.distributed.strategy, recipe.model.quantization))
    found = next((c for c in (Path(name), REPO / name) if c.is_file()), None)
    if found is None:
        raise InputError(f"distributed.accelerate_config: file not found: {name}")
    try:
        config = yaml.safe_load(found.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"distributed.accelerate_config: {name} is not valid YAML: "
                         f"{' '.join(str(exc).split())}") from None
    if not isinstance(config, dict):
        raise InputError(f"distributed.accelerate_config: {name} is not an accelerate config (not a mapping)")
    problem = config_problem(recipe, config)
    if problem:
        raise InputError(f"distributed.accelerate_config: {name}: {problem}")
    return found


def config_problem(recipe, config: dict) -> str | None:
    """Why this accelerate config cannot run this recipe, or None."""
    strategy = recipe.distributed.strategy
    kind = str(config.get("distributed_type", "NO"))
    if kind != EXPECTED_TYPE[strategy]:
        return f"distributed_type {kind}, but distributed.strategy={strategy} needs {EXPECTED_TYPE[strategy]}"
    if str(config.get("mixed_precision", "no")) != "no":
        return (f"mixed_precision {config['mixed_precision']}: precision comes from model.dtype / "
                f"model.compute_dtype; set mixed_precision: 'no'")
    if kind == "FSDP":
        return _fsdp_problem(config.get("fsdp_config") or {})
    if kind == "DEEPSPEED":
        return _deepspeed_problem(recipe, config.get("deepspeed_config") or {})
    return None


def _fsdp_problem(fsdp: dict) -> str | None:
    if fsdp.get("fsdp_version", 1) != 2:
        return f"fsdp_config.fsdp_version is {fsdp.get('fsdp_version', 1)}: {FSDP2_SETTINGS['fsdp_version'][1]}"
    for key, value in fsdp.items():
        if key in FSDP1_ONLY:
            return f"fsdp_config.{key} is an FSDP1 option, not valid under FSDP2: {FSDP1_ONLY[key]}"
        if key not in FSDP2_SETTINGS:
            close = difflib.get_close_matches(key, list(FSDP2_SETTINGS), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(FSDP2_SETTINGS)})"
            return f"unknown fsdp_config.{key}{hint}"
        accepted, why = FSDP2_SETTINGS[key]
        if value not in accepted:
            return f"fsdp_config.{key}={value} is not supported: {why}"
    return None


def _deepspeed_problem(recipe, ds: dict) -> str | None:
    for key in ds:
        if key in DEEPSPEED_FROM_RECIPE:
            return f"deepspeed_config.{key} is not used: {DEEPSPEED_FROM_RECIPE[key]}"
        if key not in DEEPSPEED_KEYS:
            close = difflib.get_close_matches(key, sorted(DEEPSPEED_KEYS), n=1, cutoff=0.6)
            return f"unknown deepspeed_config.{key}" + (f" (did you mean {close[0]}?)" if close else "")
    stage = int(recipe.distributed.strategy[-1])
    if int(ds.get("zero_stage", -1)) != stage:
        return (f"deepspeed_config.zero_stage is {ds.get('zero_stage')}, but "
                f"distributed.strategy={recipe.distributed.strategy} needs {stage}")
    for key in ("offload_optimizer_device", "offload_param_device"):
        if str(ds.get(key, "none")) not in ("none", "cpu"):
            return f"deepspeed_config.{key}={ds[key]} is not supported: none or cpu"
    if stage < 3 and str(ds.get("offload_param_device", "none")) != "none":
        return "deepspeed_config.offload_param_device needs ZeRO-3 (ZeRO-2 does not partition parameters)"
    return None


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What the trainer takes from a DeepSpeed accelerate config; the rest of DeepSpeed's config comes from the
    recipe (accumulation, clipping, precision)."""

    zero_stage: int
    offload_optimizer: bool = False
    offload_param: bool = False
    zero3_init: bool = True


def deepspeed_settings(recipe) -> DeepSpeedSettings | None:
    """Read from the recipe's own accelerate config rather than from the launcher's environment, so a process
    runs what its recipe names whichever config launched it."""
    if recipe.distributed.strategy not in ("zero2", "zero3"):
        return None
    ds = yaml.safe_load(resolve_accelerate_config(recipe).read_text()).get("deepspeed_config") or {}
    stage = int(recipe.distributed.strategy[-1])
    return DeepSpeedSettings(zero_stage=stage, offload_optimizer=str(ds.get("offload_optimizer_device")) == "cpu",
                             offload_param=str(ds.get("offload_param_device")) == "cpu",
                             zero3_init=stage == 3 and bool(ds.get("zero3_init_flag", True)))


def fsdp_offload_params(recipe) -> bool:
    """FSDP2 parameter offload (torch's CPUOffloadPolicy): the recipe's `distributed.offload_params`, or
    `fsdp_offload_params: true` in its accelerate config."""
    if recipe.distributed.strategy != "fsdp":
        return False
    if recipe.distributed.offload_params:
        return True
    fsdp = yaml.safe_load(resolve_accelerate_config(recipe).read_text()).get("fsdp_config") or {}
    return bool(fsdp.get("fsdp_offload_params", False))
