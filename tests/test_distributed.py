"""Real 2-process runs (CPU, gloo) through `accelerate launch`: every strategy x method really shards, learns,
saves, resumes exactly and leaves a loadable adapter; DDP equals one process; two 'machines' train one job."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, recipe_dict, write_recipe

pytestmark = pytest.mark.slow
ENV = {**os.environ, "TORCH_EXTENSIONS_DIR": str(REPO / "cache" / "torch_extensions"), "OMP_NUM_THREADS": "1"}
STEPS = {"max_steps": 4}
CKPT = {"every_steps": 2, "keep_last": 5}
METHODS = {  # model/adapter overrides; sharded QLoRA stores 4-bit weights in the float dtype FSDP/ZeRO-3 can shard
    "lora": ({}, {}),
    "qlora": ({"quantization": "nf4"}, {}),
    "full": ({}, {"kind": "none"}),
}
LAUNCHES = {  # one `accelerate launch` per strategy family -> (accelerate config of each recipe, strategy, method)
    # DeepSpeed stages and offload come from each recipe's own accelerate config, so one launch runs all three.
    "ddp.yaml": [("ddp.yaml", "ddp", "lora"), ("ddp.yaml", "ddp", "qlora")],
    "fsdp.yaml": [("fsdp.yaml", "fsdp", "lora"), ("fsdp.yaml", "fsdp", "qlora"), ("fsdp.yaml", "fsdp", "full"),
                  ("fsdp_qlora_offload.yaml", "fsdp", "qlora")],
    "zero3.yaml": [("zero2.yaml", "zero2", "lora"), ("zero2.yaml", "zero2", "qlora"), ("zero3.yaml", "zero3", "lora"),
                   ("zero3.yaml", "zero3", "qlora"), ("zero3.yaml", "zero3", "full"),
                   ("zero3_offload.yaml", "zero3", "lora")],
}


def steps(path):
    return {e["step"]: e["loss"] for e in map(json.loads, path.read_text().splitlines()) if "eval" not in e}


def launch(config: str, *args: str, port: int):
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(REPO / "accelerate_configs" / config),
           "--num_processes", "2", "--main_process_port", str(port), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    return result


def free_port():
    from multitune.launch.distributed import free_port

    return free_port()


@pytest.mark.parametrize("launched_with", list(LAUNCHES))
def test_strategy_shards_learns_saves_and_resumes(tmp_path, tiny_model_dir, launched_with):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    runs = {}
    for config, strategy, method in LAUNCHES[launched_with]:
        model, adapter = METHODS[method]
        if method == "qlora" and strategy in ("fsdp", "zero3"):
            model = {**model, "quant_storage": "float32"}
        name = f"{config.removesuffix('.yaml')}-{method}"
        recipe = write_recipe(tmp_path / f"{name}.yaml", recipe_dict(
            tmp_path / name, tiny_model_dir, model=model, adapter=adapter, train=STEPS, checkpoint=CKPT,
            data={"cache_dir": str(tmp_path / "cache")},  # tokenized once per launch, a cache hit after that
            distributed={"strategy": strategy, "accelerate_config": f"accelerate_configs/{config}"}))
        runs[recipe] = (config, strategy, method)
    flags = {"ddp.yaml": ["--coverage"]}.get(launched_with, ["--load-check"])
    launch(launched_with, "tests/distributed_driver.py", *flags, *map(str, runs), port=free_port())

    for recipe, (config, strategy, method) in runs.items():
        run = recipe.parent / recipe.stem / "run"
        info = json.loads((run / "metrics.full.json").read_text())["distributed"]
        assert info["world_size"] == 2, info
        if strategy == "ddp":
            assert info["wrapper"] == "DistributedDataParallel" and info["local_param_fraction"] == 1.0
        elif strategy == "fsdp":  # FSDP2 puts every parameter in a sharded DTensor: each rank holds half
            assert info["wrapper"].startswith("FSDP") and info["fsdp_units"] >= 3, info
            assert info["local_param_fraction"] == pytest.approx(0.5, abs=0.01), info
            # CPUOffloadPolicy on every unit (torch's own), shards in CPU RAM after the last step; without the
            # policy no unit offloads (on this CPU-only machine both keep their shards on the CPU device).
            offloaded = "offload" in config
            assert info["offloaded_units"] == (info["fsdp_units"] if offloaded else 0), info
            assert info["param_devices"] == ["cpu"], info
        else:
            assert info["wrapper"] == "DeepSpeedEngine" and info["zero_stage"] == int(strategy[-1]), info
            expected = 0.5 if strategy == "zero3" else 1.0  # ZeRO-3 partitions parameters, ZeRO-2 only states
            assert info["local_param_fraction"] == pytest.approx(expected, abs=0.01), info
            assert info["offload"] == ("offload" in config)
        check_big_model_loading(info["load_per_rank"], strategy, method, recipe.parent / recipe.stem)
        full, resumed = steps(run / "log.full.jsonl"), steps(run / "log.jsonl")
        assert full[4] < full[1], (method, full)
        assert sorted(resumed) == [1, 2, 3, 4]
        for step in (3, 4):  # resumed from step-2 under the same strategy: the same losses
            assert resumed[step] == pytest.approx(full[step], abs=1e-5), (method, step, full, resumed)
        checkpoint = run / "checkpoints" / "step-4"
        per_rank = {"fsdp": "sharded/__1_0.distcp", "zero2": "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                    "zero3": "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"}.get(strategy, "rng-1.pt")
        assert (checkpoint / per_rank).is_file() and (checkpoint / "rng-1.pt").is_file()
        base = AutoModelForCausalLM.from_pretrained(run / "adapter" if method == "full" else tiny_model_dir,
                                                    dtype=torch.float32)
        if method != "full":
            model = PeftModel.from_pretrained(base, str(run / "adapter"))
            trained = {n for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0}
            assert trained, "adapter weights are all zero: the gathered LoRA weights were not saved"
        else:
            original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
            changed = (base.model.layers[0].mlp.up_proj.weight - original.model.layers[0].mlp.up_proj.weight).abs()
            assert changed.max() > 1e-4  # the gathered full model, not the initial weights

    if launched_with == "ddp.yaml":  # every training sample exactly once per epoch across the two ranks
        cover = json.loads((tmp_path / "ddp-lora" / "run" / "coverage.json").read_text())
        first, second = cover["per_rank"]
        assert not set(first) & set(second)
        assert sorted(first + second) == list(range(cover["rows"]))


def check_big_model_loading(per_rank: list[dict], strategy: str, method: str, folder) -> None:
    """No rank but 0 holds the whole model before sharding: FSDP2 ranks > 0 build it on the meta device (no
    parameter bytes at all; QLoRA too: the 4-bit structure, quantization states as meta templates), ZeRO-3
    partitions it while loading (each rank half); the result equals an ordinary load. QLoRA under ZeRO-3 loads
    quantized on every rank (zero.Init refuses 4-bit loading)."""
    if strategy in ("ddp", "zero2") or (method == "qlora" and strategy == "zero3"):
        assert [r["init"] for r in per_rank] == ["full", "full"], per_rank
        return
    if method == "qlora":
        check_4bit_loading(per_rank, json.loads((folder / "load_check.json").read_text()))
        return
    check = json.loads((folder / "load_check.json").read_text())
    full_bytes = check["full_bytes"]
    assert check["load_per_rank"] == per_rank  # the check loaded exactly as training did
    if strategy == "fsdp":
        assert per_rank == [{"init": "full", "bytes": full_bytes}, {"init": "meta", "bytes": 0}], per_rank
    else:
        assert [r["init"] for r in per_rank] == ["zero.Init", "zero.Init"], per_rank
        assert all(r["bytes"] == pytest.approx(full_bytes / 2, rel=0.02) for r in per_rank), (per_rank, full_bytes)
    assert check["unmatched_keys"] == [] and check["state_keys_compared"] > 10, check
    assert check["state_max_diff"] == 0.0, check  # the same bytes as an ordinary load
    assert max(check["logits_max_diff"]) < 1e-6, check  # every rank, buffers (rotary inv_freq) included


def check_4bit_loading(per_rank: list[dict], check: dict) -> None:
    """FSDP2 QLoRA, rank-0 loading (`check_4bit_loading` in the driver): rank 0 alone read and quantized the
    model, rank 1 held no parameter bytes before sharding; afterwards each rank's shards (4-bit storage, LoRA,
    norms, embeddings) and every Linear4bit's quantization state are bit-identical to per-rank quantizing, and so
    are the logits on both ranks."""
    assert check["load_per_rank"] == per_rank  # the check loaded exactly as training did
    assert [r["init"] for r in per_rank] == ["full", "meta"] and per_rank[1]["bytes"] == 0, per_rank
    assert per_rank[0]["bytes"] == check["full_bytes"], (per_rank, check)  # rank 0: the whole 4-bit model
    assert check["quantized_params"] == [14, 14], check  # 7 linears x 2 layers, all 4-bit
    assert check["params_compared"][0] > 40 and check["differing_params"] == [[], []], check
    assert check["quant_states_compared"] == [14, 14] and check["differing_quant_states"] == [[], []], check
    assert check["logits_max_diff"] == [0.0, 0.0], check


def test_two_machines_train_one_ddp_job_equal_to_one_process(tmp_path, tiny_model_dir):
    """Two launches on this host, machine rank 0 and 1, one process each, meeting at 127.0.0.1, train one DDP job;
    and that job equals one process with the same global batch: 2 ranks x (micro-batch b, accumulation 2) see per
    step exactly the micro-batches 1 rank sees with accumulation 4 (rank r takes every 2nd of the same shuffled
    order), the loss normalised by the global target-token count. Step 1 (before any update) agrees to 1e-6; later
    steps to 5e-4 relative, because the all-reduce sums gradients in a different order and Adam's update
    (~g/sqrt(v)) amplifies that round-off for near-zero gradient components (measured: 1e-5 at step 3, 1e-4 at
    step 4). The DDP job also compiles its decoder layers (`train.compile`, LoRA dropout 0: inductor draws its own
    random numbers): DDP's gradient hooks see the compiled layers' gradients as they would eager ones."""
    from multitune.recipes.loader import validate_recipe
    from multitune.trainer.loop import train

    def recipe(name, strategy, accum, compile=False):
        return recipe_dict(tmp_path / name, tiny_model_dir, adapter={"kind": "lora", "r": 8, "dropout": 0.0},
                           train={"max_steps": 4, "grad_accum": accum, "compile": compile},
                           checkpoint={"every_steps": None}, distributed={"strategy": strategy})

    path = write_recipe(tmp_path / "ddp.yaml", recipe("ddp", "ddp", 2, compile=True))
    port = free_port()
    machines = [subprocess.Popen(
        [sys.executable, "-m", "multitune", "train", str(path), "--num_processes", "2", "--num_machines", "2",
         "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    one = validate_recipe(recipe("one", "single", 4))
    train(one)  # meanwhile, in this process
    outputs = [m.communicate(timeout=600)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "train.compile: 2 decoder layers compiled" in outputs[0], outputs[0][-3000:]
    metrics = json.loads((tmp_path / "ddp" / "run" / "metrics.json").read_text())
    assert metrics["distributed"]["world_size"] == 2 and metrics["distributed"]["wrapper"] == "DistributedDataParallel"

    two_ranks, one_rank = steps(tmp_path / "ddp" / "run" / "log.jsonl"), steps(one.output_path / "log.jsonl")
    assert sorted(two_ranks) == sorted(one_rank) == [1, 2, 3, 4]
    assert two_ranks[1] == pytest.approx(one_rank[1], rel=1e-6)
    for step in one_rank:
        assert two_ranks[step] == pytest.approx(one_rank[step], rel=5e-4), (two_ranks, one_rank)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_every_eval_hook_runs_under_every_strategy(tmp_path, tiny_model_dir, strategy):
    """Evaluation before training, the MCQ option log-likelihoods every `eval.every_steps` and the final evaluation
    are model calls: when the parameters are sharded every rank must take part, or rank 0 waits in the all-gather
    until the collective timeout (it did under FSDP2: a hang at step 2); when they are not, only the main rank."""
    path = write_recipe(tmp_path / "mcq.yaml", recipe_dict(
        tmp_path, tiny_model_dir, task="medical_mcq", data={"generator": {"n_train": 40, "n_eval": 4, "seed": 0}},
        train={"max_steps": 2, "grad_accum": 1}, eval={"every_steps": 1, "max_samples": 2, "before_training": True},
        checkpoint={"every_steps": None}, distributed={"strategy": strategy, "timeout_s": 90}))
    result = subprocess.run([sys.executable, "-m", "multitune", "train", str(path), "--num_processes", "2",
                             "--main_process_port", str(free_port())], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    periodic = [e for e in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())
                if e.get("eval") == "loss"]
    assert [e["step"] for e in periodic] == [1] and "accuracy_loglik" in periodic[0]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "accuracy_loglik" in metrics["before"] and "accuracy_loglik" in metrics["after"], metrics
    assert metrics["distributed"]["strategy"] == strategy
