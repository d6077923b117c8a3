"""Validate time: a recipe whose accelerate config the trainer cannot run (wrong type, FSDP1 options under FSDP2,
settings that would be silently ignored, ZeRO stage mismatch) fails with one line naming the file and key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from multitune.recipes.errors import InputError
from multitune.recipes.loader import validate_recipe

pytestmark = pytest.mark.unit

FSDP2 = {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_reshard_after_forward": True,
         "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_cpu_ram_efficient_loading": True,
         "fsdp_offload_params": False, "fsdp_activation_checkpointing": False}
ZERO3 = {"deepspeed_multinode_launcher": "standard", "zero_stage": 3, "offload_optimizer_device": "none",
         "offload_param_device": "none", "zero3_init_flag": True}


def recipe(tmp_path, strategy: str, config: dict | None, **model) -> dict:
    raw = {"task": "ticket_classification", "output_dir": "runs/x", "model": {"name_or_path": "m", **model},
           "data": {"generator": {}}, "distributed": {"strategy": strategy}}
    if config is not None:
        path = tmp_path / "accelerate.yaml"
        path.write_text(yaml.safe_dump(config))
        raw["distributed"]["accelerate_config"] = str(path)
    return raw


def fsdp(**changes) -> dict:
    return {"distributed_type": "FSDP", "mixed_precision": "no", "fsdp_config": {**FSDP2, **changes}}


def zero(**changes) -> dict:
    return {"distributed_type": "DEEPSPEED", "mixed_precision": "no", "deepspeed_config": {**ZERO3, **changes}}


def error_of(raw: dict) -> str:
    with pytest.raises(InputError) as info:
        validate_recipe(raw)
    message = str(info.value)
    assert "\n" not in message and "distributed.accelerate_config" in message
    return message


@pytest.mark.parametrize("name, strategy, quantized", [
    ("ddp.yaml", "ddp", False), ("fsdp.yaml", "fsdp", False), ("fsdp_qlora.yaml", "fsdp", True),
    ("zero2.yaml", "zero2", False), ("zero3.yaml", "zero3", True), ("zero3_offload.yaml", "zero3", False),
    ("single_gpu.yaml", "single", False)])
def test_shipped_configs_pass_with_their_strategy(name, strategy, quantized):
    model = {"quantization": "nf4", "quant_storage": "bfloat16"} if quantized else {}
    raw = recipe(None, strategy, None, **model)
    raw["distributed"]["accelerate_config"] = f"accelerate_configs/{name}"
    assert validate_recipe(raw).distributed.strategy == strategy


def test_the_good_configs_here_pass(tmp_path):
    assert validate_recipe(recipe(tmp_path, "fsdp", fsdp())).distributed.strategy == "fsdp"
    assert validate_recipe(recipe(tmp_path, "zero3", zero())).distributed.strategy == "zero3"


def test_strategy_must_match_the_distributed_type(tmp_path):
    assert "distributed_type DEEPSPEED, but distributed.strategy=fsdp needs FSDP" in error_of(
        recipe(tmp_path, "fsdp", zero()))
    assert "needs MULTI_GPU" in error_of(recipe(tmp_path, "ddp", fsdp()))


def test_fsdp1_config_and_fsdp1_options_are_rejected_under_fsdp2(tmp_path):
    assert "fsdp_version is 1: multitune shards with FSDP2" in error_of(recipe(tmp_path, "fsdp", fsdp(fsdp_version=1)))
    for key, value in [("fsdp_sharding_strategy", "FULL_SHARD"), ("fsdp_use_orig_params", True),
                       ("fsdp_sync_module_states", True), ("fsdp_backward_prefetch", "BACKWARD_PRE"),
                       ("fsdp_min_num_params", 100000)]:
        message = error_of(recipe(tmp_path, "fsdp", fsdp(**{key: value})))
        assert f"fsdp_config.{key} is an FSDP1 option, not valid under FSDP2" in message


def test_fsdp2_offload_comes_from_the_config_or_the_recipe_and_only_under_fsdp(tmp_path):
    from multitune.recipes.accelerate_config import fsdp_offload_params

    assert fsdp_offload_params(validate_recipe(recipe(tmp_path, "fsdp", fsdp(fsdp_offload_params=True))))
    assert not fsdp_offload_params(validate_recipe(recipe(tmp_path, "fsdp", fsdp())))
    raw = recipe(tmp_path, "fsdp", fsdp())
    raw["distributed"]["offload_params"] = True
    assert fsdp_offload_params(validate_recipe(raw))
    raw = recipe(tmp_path, "zero3", zero())
    raw["distributed"]["offload_params"] = True
    with pytest.raises(InputError, match="distributed.offload_params is FSDP2's CPU offload; under "
                                         "distributed.strategy=zero3 use accelerate_configs/zero3_offload.yaml"):
        validate_recipe(raw)


def test_wrapping_the_fsdp2_path_does_not_apply_is_rejected(tmp_path):
    assert "fsdp_auto_wrap_policy=SIZE_BASED_WRAP is not supported" in error_of(
        recipe(tmp_path, "fsdp", fsdp(fsdp_auto_wrap_policy="SIZE_BASED_WRAP")))
    assert "train.gradient_checkpointing" in error_of(
        recipe(tmp_path, "fsdp", fsdp(fsdp_activation_checkpointing=True)))
    assert "did you mean fsdp_offload_params?" in error_of(recipe(tmp_path, "fsdp", fsdp(fsdp_offload_param=False)))


def test_deepspeed_stage_offload_and_foreign_settings(tmp_path):
    assert "zero_stage is 3, but distributed.strategy=zero2 needs 2" in error_of(recipe(tmp_path, "zero2", zero()))
    assert "offload_param_device needs ZeRO-3" in error_of(
        recipe(tmp_path, "zero2", zero(zero_stage=2, offload_param_device="cpu")))
    assert "comes from train.grad_accum" in error_of(recipe(tmp_path, "zero3", zero(gradient_accumulation_steps=4)))
    assert "deepspeed_config_file is not used" in error_of(
        recipe(tmp_path, "zero3", zero(deepspeed_config_file="ds.json")))
    assert "mixed_precision bf16" in error_of(recipe(tmp_path, "zero3", {**zero(), "mixed_precision": "bf16"}))


def test_qlora_without_float_storage_cannot_be_sharded(tmp_path):
    for strategy, config in (("fsdp", fsdp()), ("zero3", zero())):
        with pytest.raises(InputError, match=f"quant_storage=uint8 cannot be sharded by {strategy}"):
            validate_recipe(recipe(tmp_path, strategy, config, quantization="nf4", quant_storage="uint8"))


def test_cli_validate_names_the_config_problem_in_one_line(tmp_path):
    raw = recipe(tmp_path, "fsdp", fsdp(fsdp_sharding_strategy="FULL_SHARD"))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-m", "multitune", "validate", str(path)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "fsdp_sharding_strategy" in result.stderr
    raw["distributed"]["accelerate_config"] = str(tmp_path / "missing.yaml")
    path.write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-m", "multitune", "validate", str(path)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "file not found" in result.stderr
