"""The benchmark harness measures what it claims: packing efficiency arithmetic, the process-tree RSS sampler, the
step FLOPs count behind MFU and the plain-generate baseline of the eval benchmark."""

from __future__ import annotations

import sys

import numpy as np

from bench import packing_efficiency as pe
from bench.common import run_measured


def test_padded_efficiency_is_real_over_padded_tokens():
    lengths = np.array([10, 30] * 8)  # any batch of 8 holds a 30: every sample is padded to 30
    assert pe.padded_efficiency(lengths) == lengths.sum() / (16 * 30)


def test_multitune_packs_a_long_tail_to_the_target():
    lengths = pe.long_tail_lengths(2048, n=3000)  # the TRL side runs in `make bench` only (importing TRL is slow)
    ours = pe.multitune_efficiency(lengths, 2048)
    assert ours >= 0.995
    assert 0.1 < pe.padded_efficiency(lengths) < ours


def test_peak_rss_counts_child_processes():
    """A child that spawns a grandchild holding 300 MB: the tree's peak must include it."""
    code = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'import time; b = bytearray(300 * 2**20); b[::4096] = b\"x\" * len(b[::4096]); time.sleep(0.5)'])")
    measured = run_measured([sys.executable, "-c", code])
    assert measured.peak_rss_mb > 300


def _lora_model(tiny_model_dir, r: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bench.flops import PROJECTIONS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(PROJECTIONS)))


def test_step_flops_match_what_torch_counts_on_a_lora_step(tiny_model_dir):
    """Forward + backward of a LoRA model with the LM head at target positions only, counted by torch's own FLOP
    counter, against `sample_flops`. torch counts attention over the full square (the count: the causal half), so
    that is added here; embeddings that require grad make layer 0 compute every input gradient, as layers above do
    (the count assumes it: a slight over-count of layer 0)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from bench.flops import Shapes, sample_flops

    model = _lora_model(tiny_model_dir, r=4)
    model.enable_input_require_grads()
    shapes = Shapes.from_config(model.config)
    length, targets = 48, 10
    ids = torch.randint(0, shapes.vocab, (1, length))
    keep = torch.arange(length - targets - 1, length - 1)
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids, logits_to_keep=keep, use_cache=False).logits
        F.cross_entropy(logits[0], ids[0, keep + 1], reduction="sum").backward()
    counted = counter.get_total_flops()
    ours = sample_flops(shapes, length, targets, lora_r=4)
    upper_half = length * length - length * (length + 1) // 2
    attention_square = shapes.layers * 3 * 4 * shapes.heads * shapes.head_dim * upper_half
    assert counted == ours + attention_square


def test_gemm_peak_reports_every_projection_both_ways(tiny_model_dir):
    from transformers import AutoConfig

    from bench.flops import PROJECTIONS, Shapes, gemm_peak

    result = gemm_peak(Shapes.from_config(AutoConfig.from_pretrained(tiny_model_dir)), tokens=64, repeats=1)
    assert len(result["shapes"]) == 2 * len(PROJECTIONS)
    assert 0 < result["mix_gflops"] <= result["peak_gflops"] + 1e-9
    assert abs(result["peak_gflops"] - max(result["shapes"].values())) < 0.06  # shapes are rounded to 0.1


def test_plain_generate_baseline_answers_what_generate_answers_answers(tiny_model_dir, tokenizer):
    """The eval benchmark's baseline (plain batched generate: input order, left padding) gives the answers
    `generate_answers` gives, with the same stop rule: the two timings compare the same work."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.eval_speed import new_tokens, plain_generate
    from multitune.data_prep.chat_encoding import stop_token_ids
    from multitune.data_prep.tasks import get_task
    from multitune.data_prep.tokenize import tokenize_examples
    from multitune.trainer.evaluate import generate_answers

    task = get_task("ticket_classification")
    batch = tokenize_examples(tokenizer, [task.format(r) for r in task.generate(6, 1)], True)
    prompts = [ids[:n] for ids, n in zip(batch.input_ids, batch.prompt_lengths)]
    prompts[2] = prompts[2][:60]  # a much shorter prompt: padding differs between the two batchings
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    cpu = torch.device("cpu")
    ours = generate_answers(model, tokenizer, prompts, 10, 4, cpu)
    plain = plain_generate(model, tokenizer, prompts, 10, 4, cpu, stop_token_ids(tokenizer, model.generation_config))
    assert plain == ours
    assert new_tokens(tokenizer, plain) == sum(len(tokenizer.encode(t, add_special_tokens=False)) + 1 for t in ours)
