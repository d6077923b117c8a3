"""The GPU benchmarks' code paths on CPU at tiny shapes: the layer-by-layer random NF4 builder, the multitune and TRL
runners, the FLOP count and the generated BENCHMARKS.md section. The GPU measurements themselves need a GPU."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from bench.gpu_model import INIT_STD, build_random_nf4, shipped_config
from bench.gpu_runner import LORA_TARGETS, Spec, train_flops_per_token

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}
CPU = torch.device("cpu")


def tiny_spec(system: str, **kw) -> Spec:
    return Spec(system, overrides={**TINY, "num_hidden_layers": 2}, seq_len=128, grad_accum=2, steps=2, warmup=1,
                attn="sdpa", **kw)


def test_builder_quantizes_layer_by_layer_and_never_materialises_layers_ahead():
    import bitsandbytes as bnb

    config = shipped_config("Llama-3.1-8B-Instruct", **TINY)
    seen = []

    def check(i: int, model) -> None:
        layers = model.get_decoder().layers
        for j, layer in enumerate(layers):
            devices = {p.device.type for p in layer.parameters()}
            assert devices == ({"cpu"} if j <= i else {"meta"}), (i, j, devices)
        # Built layers keep no bf16 matrix: every 2-D weight became 4-bit (the bf16 copy is gone).
        built = [m for layer in layers[: i + 1] for m in layer.modules()]
        assert not any(type(m) is torch.nn.Linear for m in built)
        assert sum(isinstance(m, bnb.nn.Linear4bit) for m in built) == 7 * (i + 1)
        seen.append(i)

    model = build_random_nf4(config, CPU, "sdpa", on_layer=check)
    assert seen == [0, 1, 2]
    q = model.get_decoder().layers[1].self_attn.q_proj
    assert q.weight.quant_state.quant_type == "nf4" and q.weight.quant_state.nested  # double quant
    assert q.compute_dtype == torch.bfloat16
    assert q.quant_state is q.weight.quant_state  # FSDP2's DTensor swap loses the parameter's; the module's stays
    weight = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    assert weight.shape == (64, 64) and abs(weight.std().item() - INIT_STD) < 0.15 * INIT_STD
    assert torch.all(model.get_decoder().layers[2].input_layernorm.weight == 1)
    # Rotary frequencies are computed (llama3 scaling), not left uninitialised by to_empty.
    fresh = type(model.get_decoder().rotary_emb)(model.config)
    assert torch.equal(model.get_decoder().rotary_emb.inv_freq, fresh.inv_freq)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert all(b.device.type == "cpu" for b in model.buffers())
    logits = model(input_ids=torch.randint(0, 512, (1, 16))).logits
    assert logits.shape == (1, 16, 512) and torch.isfinite(logits).all()


def test_lora_on_built_model_trains_only_adapters():
    from multitune.recipes.schema import AdapterConfig
    from multitune.trainer.model import prepare_for_training

    config = shipped_config("Llama-3.1-8B-Instruct", **{**TINY, "num_hidden_layers": 2})
    model = build_random_nf4(config, CPU, "sdpa")
    adapter = AdapterConfig(kind="lora", r=8, alpha=16, dropout=0.0, target_modules=LORA_TARGETS)
    model = prepare_for_training(model, True, adapter, gradient_checkpointing=True)
    base = model.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight.data.clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 512, (1, 32))
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(model.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight.data, base)


def test_flop_count_matches_the_built_model():
    """The shape-derived N (matmul weights) and P (LoRA parameters) equal those of the model actually built."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from multitune.launch.plan import model_shape

    config = shipped_config("Llama-3.1-8B-Instruct", **TINY)
    shape = model_shape(config, "test")
    model = build_random_nf4(config, CPU, "sdpa")
    n = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit,)))
    n += model.lm_head.weight.numel()
    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules=LORA_TARGETS))
    p = sum(x.numel() for x in peft_model.parameters() if x.requires_grad)
    d, layers = 4 * 16, 3
    lengths = [100, 28]
    expected = (4 * n * 128 + 6 * p * 128 + 3 * 2 * (100**2 + 28**2) * d * layers) / 128
    assert train_flops_per_token(shape, 16, lengths) == pytest.approx(expected)


@pytest.fixture(scope="module")
def multitune_run():
    from bench.gpu_runner import multitune

    return multitune(tiny_spec("multitune"))


def test_multitune_runner_drives_the_loop_step(multitune_run):
    r = multitune_run
    assert r["linear4bit"] == 14 and r["attn"] == "sdpa" and r["world_size"] == 1
    assert r["distributed"]["wrapper"] == "PeftModelForCausalLM"
    assert len(r["losses"]) == 3 and all(5.0 < x < 7.5 for x in r["losses"])  # ~ln(512) for random weights
    assert r["tokens"] > 0 and r["tokens_per_s"] > 0


def test_gpu_section_keeps_the_cpu_section(multitune_run):
    from bench.gpu import END, START, planner_estimate, render, with_section
    from bench.run import END as CPU_END
    from bench.run import START as CPU_START

    spec = tiny_spec("multitune")
    plan = planner_estimate(spec, 80.0)
    result = {**multitune_run, "spec": asdict(spec), "planner": plan, "mfu": 0.5}
    details = {"machine": "test", "date": "today", "minutes": 0.1, "matmul_peak": {"tflops": 1.0}}
    cpu = f"# Bench\n\n{CPU_START}\nCPU figures\n{CPU_END}\n"
    once = with_section(cpu, render({"8b_multitune_2048": result}, details))
    twice = with_section(once, render({"8b_multitune_2048": {**result, "tokens_per_s": 1.0}}, details))
    assert f"{CPU_START}\nCPU figures\n{CPU_END}" in twice
    assert twice.count(START) == 1 and twice.count(END) == 1
    row = next(line for line in twice.splitlines() if line.startswith("| 8b_multitune_2048"))
    assert "| 1 |" in row and "50.0%" in row and f"{plan['peak_gib']:.1f}" in row


def test_planner_sees_the_real_parameter_counts():
    from bench.gpu import planner_estimate

    eight = planner_estimate(Spec("multitune", "Llama-3.1-8B-Instruct"), 80.0)
    seventy = planner_estimate(Spec("multitune", "Llama-3.3-70B-Instruct", gradient_checkpointing=True), 80.0)
    assert eight["params_b"] == pytest.approx(8.03, abs=0.01) and seventy["params_b"] == pytest.approx(70.55, abs=0.01)
    assert seventy["fits"]


@pytest.mark.slow
def test_trl_runner_trains_the_same_model():
    from bench.gpu_runner import trl

    r = trl(tiny_spec("trl"))
    assert r["linear4bit"] == 14 and r["attn"] == "sdpa"
    assert r["tokens"] > 0 and len(r["losses"]) == 3 and all(5.0 < x < 7.5 for x in r["losses"])


@pytest.mark.slow
def test_fsdp_path_runs_under_torchrun_as_bench_gpu_launches_it():
    """bench.gpu's launch of a sharded run (torchrun, one process): FSDP2 really wraps the NF4 + LoRA model."""
    from bench.gpu import measure

    r = measure(tiny_spec("multitune", strategy="fsdp"), timeout_s=600)
    assert "error" not in r, r.get("error")
    assert r["distributed"]["wrapper"] == "FSDPLlamaForCausalLM" and r["distributed"]["fsdp_units"] == 3
    assert r["world_size"] == 1 and r["linear4bit"] == 14
    assert all(5.0 < x < 7.5 for x in r["losses"])
