"""Floating-point work of a LoRA training step on a Llama-style model, counted from its config, and the CPU's fp32
GEMM peak measured on that model's own matmul shapes: the two halves of MFU (model FLOPs utilisation)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shapes:
    """What the count needs from a Llama config: widths, depth and vocabulary."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> Shapes:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads, head_dim, config.vocab_size)

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}


def sample_flops(shapes: Shapes, length: int, targets: int, lora_r: int, lora_modules=PROJECTIONS) -> int:
    """FLOPs of forward + backward for one sample of `length` tokens with `targets` target tokens, base frozen.

    Frozen linear layers: 2 FLOPs per weight per token forward, 2 more backward (gradient of the input only).
    LoRA A and B: 2 forward, 4 backward (input and weight gradients). Attention (scores and weighted sum) over the
    causal pairs of the sample only: 4 * heads * head_dim per pair forward, twice that backward. The LM head only
    at target positions (the loss needs nothing else), 2 forward + 2 backward per weight; embeddings are look-ups.
    Layer 0's input gradients are counted although a frozen embedding needs none (a slight over-count there);
    torch's own FLOP counter agrees exactly on that basis (tests/test_bench.py).
    """
    frozen = lora = 0
    for name, (fan_in, fan_out) in shapes.projections().items():
        frozen += fan_in * fan_out
        if name in lora_modules:
            lora += lora_r * (fan_in + fan_out)
    per_token = shapes.layers * (4 * frozen + 6 * lora)
    pairs = length * (length + 1) // 2
    attention = shapes.layers * 3 * 4 * shapes.heads * shapes.head_dim * pairs
    head = 4 * shapes.hidden * shapes.vocab * targets
    return length * per_token + attention + head


def gemm_peak(shapes: Shapes, tokens: int = 4096, repeats: int = 5) -> dict:
    """fp32 GFLOP/s of torch.matmul on the step's shapes (`tokens` rows): each projection as the forward (x @ W.T)
    and the input gradient (g @ W) compute it, best of `repeats`. Returns the best shape's rate (`peak`), the rate
    over all shapes together (`mix`) and each shape's rate."""
    rates, total_flops, total_s = {}, 0, 0.0
    for name, (fan_in, fan_out) in shapes.projections().items():
        weight = torch.randn(fan_out, fan_in)
        for kind, a, b in (("fwd", torch.randn(tokens, fan_in), weight.t()),
                           ("bwd", torch.randn(tokens, fan_out), weight)):
            torch.matmul(a, b)  # warm-up: page in, pick the kernel
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                torch.matmul(a, b)
                best = min(best, time.perf_counter() - started)
            flops = 2 * tokens * fan_in * fan_out
            rates[f"{name}.{kind} {tokens}x{a.shape[1]}x{b.shape[1]}"] = flops / best / 1e9
            total_flops += flops
            total_s += best
    return {"peak_gflops": max(rates.values()), "mix_gflops": total_flops / total_s / 1e9,
            "threads": torch.get_num_threads(), "shapes": {k: round(v, 1) for k, v in rates.items()}}
