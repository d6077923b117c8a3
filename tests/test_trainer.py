"""The loop: token-normalised accumulation, exact resume, run outputs, adapter loading, merging, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, recipe_dict, write_recipe


@pytest.mark.unit
def test_accumulated_micro_batches_equal_one_batch_of_the_same_tokens(tiny_model_dir):
    from accelerate import Accelerator
    from peft import get_peft_model
    from test_packing import ArrayDataset
    from transformers import AutoModelForCausalLM

    from multitune.recipes.schema import AdapterConfig
    from multitune.trainer.batches import MicroBatchStream, attention_mask_for
    from multitune.trainer.lm_loss import token_loss_sum
    from multitune.trainer.loop import accumulate_gradients
    from multitune.trainer.model import lora_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, lora_config(AdapterConfig(r=4, dropout=0.0), model))
    for name, p in model.named_parameters():  # non-zero B so every LoRA weight gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    rng = np.random.default_rng(0)
    # samples with very different numbers of target tokens: per-micro-batch averaging would weigh them wrongly
    rows = [rng.integers(5, 30000, size=n).astype(np.int32) for n in (40, 9, 70, 25)]
    labels = [np.where(np.arange(len(r)) < len(r) // k, -100, r).astype(np.int32) for r, k in zip(rows, (2, 9, 1, 3))]
    stream = MicroBatchStream(ArrayDataset(rows, labels), plan=[[]], seed=0)
    accelerator = Accelerator(cpu=True)

    def lm_loss(model, batch):
        return token_loss_sum(model, batch, attention_mask_for(batch, torch.float32, "sdpa"))

    def grads(window):
        model.zero_grad()
        loss, targets, _ = accumulate_gradients(model, window, accelerator, lm_loss)
        return loss / targets, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    split = [stream.collate([np.array([0]), np.array([1])]), stream.collate([np.array([2, 3])])]
    whole = [stream.collate([np.array([0, 1]), np.array([2]), np.array([3])])]
    loss_a, grads_a = grads(split)
    loss_b, grads_b = grads(whole)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5)


def run_cli(*args, cwd=None, check=True, env=None):
    result = subprocess.run([sys.executable, "-m", "multitune", *args], capture_output=True, text=True,
                            cwd=cwd or REPO, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"multitune {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def assert_one_line_error(stderr: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr


def step_losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in lines if "eval" not in e}


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_resumed_run_matches_uninterrupted_run(tmp_path, tiny_model_dir, quantization):
    """Stop after the step-4 checkpoint (later checkpoints and log lines gone), --resume, compare every later step."""
    from multitune.recipes.loader import validate_recipe
    from multitune.trainer.loop import train

    recipe = validate_recipe(recipe_dict(tmp_path, tiny_model_dir, model={"quantization": quantization},
                                         train={"max_steps": 8, "micro_batch_tokens": 512},
                                         checkpoint={"every_steps": 2, "keep_last": 10}))
    train(recipe)
    run = recipe.output_path
    full = step_losses(run)
    assert len(full) == 8 and full[8] < full[1]
    for path in (run / "checkpoints").iterdir():
        if int(path.name.split("-")[1]) > 4:
            shutil.rmtree(path)
    for name in ("adapter", "metrics.json", "loss.png"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    lines = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("\n".join(line for line in lines if json.loads(line).get("step", 0) <= 5) + "\n")
    train(recipe, resume=True)
    resumed = step_losses(run)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(full[step], abs=1e-5), step


def test_cli_train_writes_every_run_output(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(
        tmp_path, tiny_model_dir, eval={"before_training": True, "max_samples": 4, "max_new_tokens": 6},
        model={"quantization": "nf4"}))
    result = run_cli("train", str(recipe), "train.max_steps=4", "checkpoint.every_steps=2")
    run = tmp_path / "run"
    assert {"recipe.resolved.yaml", "log.jsonl", "metrics.json", "adapter", "checkpoints", "loss.png"} <= {
        p.name for p in run.iterdir()}
    assert "max_steps: 4" in (run / "recipe.resolved.yaml").read_text()
    entries = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [e for e in entries if "eval" not in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    for entry in steps:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(entry)
        assert entry["tokens"] > 0 and entry["tokens_per_s"] > 0
    assert {e["eval"] for e in entries if "eval" in e} == {"before", "after"}
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("before", "after"):
        assert {"category", "subcategory", "urgency", "exact_match", "parse_rate"} <= set(metrics[key])
    assert metrics["tokens_per_s"] > 0 and 0 < metrics["packing_efficiency"] <= 1
    later = steps[1:]  # the steady rate leaves out the first step's one-off costs
    assert metrics["tokens_per_s_after_first_step"] == pytest.approx(
        sum(e["tokens"] for e in later) / sum(e["tokens"] / e["tokens_per_s"] for e in later), rel=1e-6)
    assert metrics["first_step_seconds"] == pytest.approx(steps[0]["tokens"] / steps[0]["tokens_per_s"], abs=0.01)
    assert (f"({metrics['tokens_per_s_after_first_step']:.0f} after the first step of "
            f"{metrics['first_step_seconds']:.1f} s)") in result.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert "exact_match" in result.stdout and "packing efficiency" in result.stdout
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    assert any("lora_A" in name for name, _ in model.named_parameters())
    assert (run / "adapter" / "README.md").read_text().count("multitune") >= 1

    # the same output_dir again without --resume/--overwrite: refused, earlier run untouched
    before = (run / "metrics.json").read_text()
    again = run_cli("train", str(recipe), check=False)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert_one_line_error(again.stderr)
    assert (run / "metrics.json").read_text() == before
    # --overwrite with data that turns out bad: refused before the earlier run is touched
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    again = run_cli("train", str(recipe), "--overwrite", "data.generator=null", f"data.train_file={bad}", check=False)
    assert again.returncode == 2 and f"{bad}:1: malformed JSON" in again.stderr
    assert (run / "metrics.json").read_text() == before and (run / "adapter").is_dir()
    # --overwrite with train.compile and a CXX that compiles nothing: refused before prep, the earlier run kept
    again = run_cli("train", str(recipe), "--overwrite", "train.compile=true", check=False,
                    env={**os.environ, "CXX": shutil.which("true")})
    assert again.returncode == 2 and "did not compile a one-line C++ program" in again.stderr
    assert_one_line_error(again.stderr)
    assert (run / "metrics.json").read_text() == before and (run / "adapter").is_dir()


def test_group_by_length_reaches_the_loop_and_pads_less_than_random_batches(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tmp_path, tiny_model_dir, checkpoint={"every_steps": None}))
    efficiency = {}
    for name, grouped in (("grouped", "true"), ("padded", "false")):
        run_cli("train", str(recipe), "data.packing=false", f"data.group_by_length={grouped}", "train.max_steps=2",
                f"output_dir={tmp_path / name}")
        efficiency[name] = json.loads((tmp_path / name / "metrics.json").read_text())["packing_efficiency"]
    # random batches pad every row to their longest ticket; neighbours in length order differ by a token or two
    assert efficiency["grouped"] > 0.99 and efficiency["grouped"] - efficiency["padded"] > 0.02


def test_compiled_layers_train_like_eager_ones(tmp_path, tiny_model_dir):
    """`train.compile` (with gradient checkpointing, the harder path) takes the same steps as eager layers without
    it, saves an adapter with the same parameter names and values, and evaluates by generation (eagerly) to the same
    metrics.
    LoRA dropout 0: inductor draws its own random numbers, so dropout masks would differ."""
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    from multitune.recipes.loader import load_recipe
    from multitune.trainer.loop import train

    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(
        tmp_path, tiny_model_dir, adapter={"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        train={"max_steps": 3}, checkpoint={"every_steps": None}))
    run_cli("train", str(recipe), f"output_dir={tmp_path / 'eager'}")
    counters.clear()
    train(load_recipe(recipe, [f"output_dir={tmp_path / 'compiled'}", "train.compile=true",
                               "train.gradient_checkpointing=true"]))
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters)  # inductor compiled the layers
    eager, compiled = step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2, 3] and compiled == pytest.approx(eager, rel=1e-5), (eager, compiled)
    weights = [load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("eager", "compiled")]
    assert sorted(weights[0]) == sorted(weights[1]) and any("lora_B" in name for name in weights[1])
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], atol=1e-5, rtol=1e-4)
    after = [json.loads((tmp_path / run / "metrics.json").read_text())["after"] for run in ("eager", "compiled")]
    for metrics in after:
        del metrics["seconds"]
    assert "category" in after[1] and after[1] == after[0]


@pytest.mark.unit
def test_compile_needs_a_compiler_that_compiles(monkeypatch):
    from multitune.recipes.errors import InputError
    from multitune.trainer.model import check_compiler, compile_decoder_layers

    cpu = torch.device("cpu")
    check_compiler(cpu)  # this machine's g++ builds the one-line program
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with pytest.raises(InputError, match="train.compile: torch.compile on CPU needs a C\\+\\+ compiler and "
                                         "CXX=no-such-c\\+\\+-compiler is not on PATH \\(fix or unset CXX\\)"):
        check_compiler(cpu)
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(InputError, match="CXX=/nonexistent/g\\+\\+ does not exist"):
        check_compiler(cpu)
    monkeypatch.setenv("CXX", shutil.which("true"))  # exists, exits 0, builds nothing
    with pytest.raises(InputError, match="did not compile a one-line C\\+\\+ program"):
        check_compiler(cpu)
    monkeypatch.delenv("CXX")
    with pytest.raises(InputError, match="train.compile: this model has no list of decoder layers"):
        compile_decoder_layers(torch.nn.Linear(2, 2))


def test_merge_reproduces_base_plus_adapter(tmp_path, tiny_model_dir):
    """LoRA: merged == base + adapter. QLoRA: merged == dequantized-NF4 base + adapter, and closer to the trained
    4-bit model than a merge onto the original weights (bitsandbytes' CPU 4-bit matmul is itself inexact)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from multitune.recipes.loader import validate_recipe
    from multitune.trainer.loop import train
    from multitune.trainer.merge import dequantize_nf4, merge_adapter

    ids = torch.randint(5, 30000, (2, 30))

    def logits(model):
        with torch.no_grad():
            return model(ids).logits

    plain = logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)

    def nf4_base():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant, dtype=torch.float32,
                                                    device_map={"": "cpu"})

    for quantization in ("none", "nf4"):
        recipe = validate_recipe(recipe_dict(tmp_path / quantization, tiny_model_dir,
                                             model={"quantization": quantization}, train={"max_steps": 3, "lr": 5e-3},
                                             checkpoint={"every_steps": None}))
        train(recipe)
        adapter = recipe.output_path / "adapter"
        merged = logits(AutoModelForCausalLM.from_pretrained(merge_adapter(adapter, tmp_path / quantization / "m"),
                                                             dtype=torch.float32))
        if quantization == "none":
            expected = logits(PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), str(adapter)))
            assert (expected - plain).abs().max() > 1e-3  # the adapter changed something
            torch.testing.assert_close(merged, expected, atol=2e-4, rtol=1e-4)
            continue
        expected = logits(PeftModel.from_pretrained(dequantize_nf4(nf4_base(), torch.float32), str(adapter)))
        torch.testing.assert_close(merged, expected, atol=2e-4, rtol=1e-4)
        trained = logits(PeftModel.from_pretrained(nf4_base(), str(adapter)))
        onto_original = logits(AutoModelForCausalLM.from_pretrained(
            merge_adapter(adapter, tmp_path / "nf4" / "m-orig", onto="original"), dtype=torch.float32))
        assert (merged - trained).abs().mean() < (onto_original - trained).abs().mean()


def test_malformed_row_reported_with_file_and_line(tmp_path, tiny_model_dir):
    data = tmp_path / "tickets.jsonl"
    data.write_text('{"title": "a", "description": "b", "category": "billing", "subcategory": "refund", '
                    '"urgency": "low"}\n{"title": broken\n')
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tmp_path, tiny_model_dir, data={
        "generator": None, "train_file": str(data), "cache_dir": str(tmp_path / "cache")}))
    result = run_cli("prep", str(recipe), check=False)
    assert result.returncode == 2 and f"{data}:2: malformed JSON" in result.stderr
    assert not (tmp_path / "run").exists()


def test_eval_command_compares_base_and_adapter(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tmp_path, tiny_model_dir, train={"max_steps": 2},
                                                           checkpoint={"every_steps": None}))
    run_cli("train", str(recipe))
    result = run_cli("eval", str(recipe), "--adapter", str(tmp_path / "run" / "adapter"))
    assert "| metric" in result.stdout and "exact_match" in result.stdout
    header = (tmp_path / "run" / "eval" / "comparison.csv").read_text().splitlines()[0]
    assert header == "metric,base,run"
    for name in ("base", "run"):
        metrics = json.loads((tmp_path / "run" / "eval" / f"{name}.json").read_text())
        assert {"category", "exact_match", "parse_rate", "samples"} <= set(metrics) and metrics["samples"] == 4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_command_builds_a_loadable_chat_model(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / arch
    run_cli("tiny-model", "--arch", arch, "--out", str(out), "--hidden-size", "32", "--layers", "1")
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == arch and len(tokenizer) == 32000
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                        return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], 32000)
    assert run_cli("tiny-model", "--out", str(out), check=False).returncode == 2  # never overwrites


def test_debug_model_is_rebuilt_when_its_spec_changes(tmp_path):
    from multitune.recipes.schema import TinyModelSpec
    from multitune.trainer.tiny_model import ensure_tiny_model

    path = tmp_path / "tiny"
    small = TinyModelSpec(hidden_size=32, num_layers=1, intermediate_size=64)
    ensure_tiny_model(small, path)
    first = (path / "model.safetensors").stat().st_mtime_ns
    ensure_tiny_model(small, path)
    assert (path / "model.safetensors").stat().st_mtime_ns == first  # same spec: reused
    ensure_tiny_model(small.model_copy(update={"num_layers": 2}), path)
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 2
    foreign = tmp_path / "users-model"
    foreign.mkdir()
    ensure_tiny_model(small, foreign)  # not ours (no marker): left alone
    assert list(foreign.iterdir()) == []


def test_a_run_that_builds_its_debug_model_trains_like_one_that_finds_it_built(tmp_path):
    """The first run on a fresh checkout builds the tiny model and tokenizes the data; the same recipe run again
    finds both. Neither may move the random state the training seed set: every step's loss is the same, exactly."""
    from conftest import TINY_SPEC

    from multitune.recipes.loader import validate_recipe
    from multitune.trainer.loop import train

    def run(name: str) -> dict[int, float]:
        recipe = validate_recipe(recipe_dict(
            tmp_path / name, tmp_path / "model", model={"tiny": {**TINY_SPEC, "seed": 7}},
            data={"cache_dir": str(tmp_path / "cache")}, train={"max_steps": 4, "micro_batch_tokens": 512, "seed": 3},
            checkpoint={"every_steps": None}))
        train(recipe)
        return step_losses(recipe.output_path)

    cold = run("cold")  # builds the model and the prep cache
    assert (tmp_path / "model" / "model.safetensors").is_file()
    warm = run("warm")
    assert sorted(cold) == [1, 2, 3, 4]
    assert warm == cold  # exact: dropout and the LoRA init draw the same numbers


def test_qlora_gradients_survive_an_evaluation_pass(tiny_model_dir):
    """Regression: bitsandbytes repacks 4-bit weights for a no-autograd CPU kernel on the first eval forward,
    which silently cut gradients through frozen layers for the rest of training."""
    from multitune.recipes.schema import AdapterConfig, ModelConfig
    from multitune.trainer.model import load_model

    config = ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32", compute_dtype="float32",
                         quantization="nf4")
    ids = torch.randint(5, 30000, (1, 24))

    def first_layer_grad(evaluate_first: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = load_model(config, AdapterConfig(r=4, dropout=0.0), torch.device("cpu"), False)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids).logits.sum().backward()
        return next(p.grad for n, p in model.named_parameters() if "layers.0.self_attn.q_proj.lora_A" in n)

    torch.testing.assert_close(first_layer_grad(True), first_layer_grad(False))


def test_4bit_bases_keep_fp32_outside_4bit_where_that_is_faster_or_safer():
    """fp16 always (range); bf16 on a CPU-only machine (fp32 element-wise work is faster there), never on a GPU
    machine (bf16 is QLoRA's compute dtype: an upcast made activations fp32)."""
    from multitune.trainer.model import keeps_fp32_outside_4bit

    assert keeps_fp32_outside_4bit(torch.float16, on_gpu=True) and keeps_fp32_outside_4bit(torch.float16, False)
    assert keeps_fp32_outside_4bit(torch.bfloat16, on_gpu=False)
    assert not keeps_fp32_outside_4bit(torch.bfloat16, on_gpu=True)
    assert not keeps_fp32_outside_4bit(torch.float32, on_gpu=False)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_qlora_trains_under_packing_masks_whatever_the_query_dtype(tiny_model_dir, backend, dtype):
    """On this (CPU-only) machine a 4-bit base gets fp32 norms/embeddings/head, so its queries are fp32 while the
    recipe says bf16 or fp16: the packing mask must work whatever the query dtype (a float mask of the recipe's
    dtype made sdpa raise). LoRA weights are fp32 (peft)."""
    from test_packing import ArrayDataset

    from multitune.recipes.schema import AdapterConfig, ModelConfig
    from multitune.trainer.batches import MicroBatchStream, attention_mask_for
    from multitune.trainer.lm_loss import token_loss_sum
    from multitune.trainer.model import DTYPES, load_model

    config = ModelConfig(name_or_path=str(tiny_model_dir), dtype=dtype, compute_dtype="bfloat16",
                         quantization="nf4", attn_implementation=backend)
    model = load_model(config, AdapterConfig(r=4), torch.device("cpu"), gradient_checkpointing=False)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and type(p).__name__ != "Params4bit"}
    assert frozen == ({torch.bfloat16} if torch.cuda.is_available() and dtype == "bfloat16" else {torch.float32})
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    rows = [np.arange(5, 25, dtype=np.int32), np.arange(30, 42, dtype=np.int32)]
    batch = MicroBatchStream(ArrayDataset(rows, rows), plan=[[]], seed=0).collate([np.array([0, 1])])
    hidden = model(input_ids=batch.input_ids, output_hidden_states=True).hidden_states[-1]
    assert hidden.dtype == next(iter(frozen))
    loss = token_loss_sum(model, batch, attention_mask_for(batch, DTYPES[config.dtype], backend))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_one_loader_gives_the_causal_lm_and_its_body_the_same_preparation(tiny_model_dir, quantization):
    """`load_model(body_only=True)` (the process-monitoring backbone) is the causal LM's loader minus the LM head:
    same base weights, same 4-bit layers and kbit preparation, LoRA on the same chosen layers (peft's
    `layers_pattern` found on the bare body too), no KV cache; the meta-device build gives the same parameters."""
    import bitsandbytes as bnb

    from multitune.recipes.schema import AdapterConfig, ModelConfig
    from multitune.trainer.model import load_model

    config = ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32", compute_dtype="float32",
                         quantization=quantization)
    adapter = AdapterConfig(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    torch.manual_seed(0)
    lm = load_model(config, adapter, torch.device("cpu"), gradient_checkpointing=True)
    torch.manual_seed(0)
    body = load_model(config, adapter, torch.device("cpu"), gradient_checkpointing=True, body_only=True)
    assert "lm_head" not in {n.split(".")[-2] for n, _ in body.named_parameters()}
    lm_params = {n.replace("base_model.model.model.", ""): p for n, p in lm.named_parameters()}
    body_params = {n.replace("base_model.model.", ""): p for n, p in body.named_parameters()}
    assert set(body_params) == set(lm_params) - {n for n in lm_params if "lm_head" in n}
    for name, p in body_params.items():
        assert p.requires_grad == lm_params[name].requires_grad, name
        assert torch.equal(p, lm_params[name]), name  # same base weights, same LoRA init from the same seed
    assert {n.split("layers.")[1].split(".")[0] for n, p in body_params.items() if p.requires_grad} == {"1"}
    four_bit = [m for m in body.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert bool(four_bit) == (quantization == "nf4")
    assert body.config.use_cache is False and lm.config.use_cache is False
    if quantization == "none":
        frozen = load_model(config, AdapterConfig(kind="none"), torch.device("cpu"), False, body_only=True,
                            freeze=True)
        assert not any(p.requires_grad for p in frozen.parameters())
        meta = load_model(config, adapter, torch.device("cpu"), False, weights=False, body_only=True)
        assert {n: p.shape for n, p in meta.named_parameters()} == {
            n: p.shape for n, p in body.named_parameters()}
        assert all(p.is_meta for p in meta.parameters())
