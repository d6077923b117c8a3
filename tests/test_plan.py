"""The memory planner: shipped configs give the published parameter counts, the 70B verdicts, and the estimate
against a measured peak (CPU RSS of real LoRA training steps)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from launch.cli import main
from launch.plan import CUDA_CONTEXT, Setup, estimate, load_config, model_shape, plan_recipe
from recipes.loader import load_recipe, validate_recipe

FSDP_70B = REPO / "recipes/ticket_classification/llama70b_qlora_fsdp_2x24gb.yaml"


@pytest.mark.parametrize("hub_id, billions", [
    ("meta-llama/Llama-3.3-70B-Instruct", 70.55), ("meta-llama/Llama-3.1-8B-Instruct", 8.03),
    ("mistralai/Mistral-7B-Instruct-v0.3", 7.25), ("Qwen/Qwen2.5-3B-Instruct", 3.09),
    ("Qwen/Qwen2.5-7B-Instruct", 7.62)])
def test_shipped_configs_give_published_parameter_counts(hub_id, billions):
    shape = model_shape(*load_config(hub_id))
    assert abs(shape.total_params / 1e9 - billions) < 0.01
    assert "not available offline" in shape.source


def test_70b_qlora_does_not_fit_2x24gb_fsdp_without_offload_but_fits_one_80gb(capsys):
    assert main(["plan", str(FSDP_70B), "--gpus", "2", "--gpu-mem", "24"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "recommendation: distributed.strategy=zero3 with zero3_offload.yaml" in out
    assert main(["plan", str(FSDP_70B), "--gpus", "1", "--gpu-mem", "80", "distributed.strategy=single",
                 "distributed.accelerate_config=null"]) == 0
    assert "verdict: FITS" in capsys.readouterr().out


def test_sharding_divides_what_each_strategy_shards():
    recipe = load_recipe(FSDP_70B, ["distributed.strategy=single", "distributed.accelerate_config=null"])
    plan, _ = plan_recipe(recipe, 1, 80)
    one = dict((n, b) for n, b, _ in plan.items)
    for strategy, weights_div, state_div in (("ddp", 1, 1), ("zero2", 1, 4), ("zero3", 4, 4)):
        items = dict((n, b) for n, b, _ in estimate(recipe, model_shape(*load_config(recipe.model.name_or_path)),
                                                     Setup(strategy, 4, 1024, True), 80).items)
        assert items["weights: NF4 linear layers"] == pytest.approx(one["weights: NF4 linear layers"] / weights_div)
        assert items["gradients (trainable only)"] * state_div == pytest.approx(
            one["gradients (trainable only)"] * (0.5 if strategy != "ddp" else 1), rel=1e-6)


def test_estimate_matches_measured_cpu_peak(tmp_path):
    """Real LoRA steps (fp32, no checkpointing) in a fresh process; peak RSS over a post-warm-up baseline."""
    from transformers import LlamaConfig

    model_dir = tmp_path / "model"
    LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=8000, tie_word_embeddings=False).save_pretrained(model_dir)
    tokens = 2048
    done = subprocess.run([sys.executable, str(REPO / "tests/memory_driver.py"), str(model_dir), str(tokens), "0",
                           "8", "0.1"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])["peak_delta"]
    recipe = validate_recipe({"task": "ticket_classification", "output_dir": str(tmp_path / "run"),
                              "model": {"name_or_path": str(model_dir), "dtype": "float32", "compute_dtype": "float32"},
                              "adapter": {"r": 8, "dropout": 0.1}, "data": {"generator": {}, "max_seq_len": tokens},
                              "train": {"micro_batch_tokens": tokens}})
    plan = estimate(recipe, model_shape(*load_config(str(model_dir))), Setup("single", 1, tokens, False), 80)
    predicted = plan.peak - CUDA_CONTEXT  # no CUDA context on CPU
    # Measured here: the estimate is 12-16% below the CPU peak (oneDNN/sdpa scratch buffers, malloc arenas).
    assert 0.8 <= predicted / measured <= 1.15, (predicted, measured)
