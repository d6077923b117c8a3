"""One GPU benchmark measurement in its own process (so peak memory is its own): `python -m bench.gpu_runner SPEC`,
SPEC a JSON object (see `Spec`). Prints one JSON line. The same code runs on CPU at tiny shapes
(tests/test_gpu_bench.py).

Systems:
- `matmul_peak`: the card's sustained bf16 matmul rate (the MFU denominator).
- `multitune`: multitune's step, driven directly with the functions `trainer/loop.py` uses (create_strategy,
  Strategy.prepare, accumulate_gradients, clip, AdamW step) on a random NF4 model from bench/gpu_model.py —
  not `multitune train` end to end, which would need the model's weights on disk. Strategies single, fsdp, zero3
  (run under torchrun for the last two).
- `trl`: TRL's SFTTrainer on the same model, samples, LoRA and tokens per step (packing + padding_free).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from multitune.compat import attn_implementation

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all-linear, Llama


@dataclass
class Spec:
    system: str                      # matmul_peak | multitune | trl
    model: str = "Llama-3.1-8B-Instruct"
    overrides: dict = field(default_factory=dict)  # config fields (tiny shapes for the CPU test)
    seq_len: int = 2048              # packed row length
    grad_accum: int = 4              # one packed row per micro-batch; tokens per step = grad_accum x seq_len
    steps: int = 20                  # timed optimizer steps
    warmup: int = 3                  # untimed optimizer steps first
    gradient_checkpointing: bool = False
    strategy: str = "single"         # multitune only: single | fsdp | zero3
    offload: bool = False            # fsdp only: torch's CPUOffloadPolicy (shards in CPU RAM)
    attn: str = "flash_attention_2"
    r: int = 16
    lr: float = 1e-4
    seed: int = 0


def samples(spec: Spec, vocab: int) -> list[np.ndarray]:
    """Random token ids of varied lengths (64 .. seq_len, uniform), enough for every step's rows."""
    rng = np.random.default_rng(spec.seed)
    rows = (spec.warmup + spec.steps) * spec.grad_accum
    count = rows * spec.seq_len // ((64 + spec.seq_len) // 2) + 2 * rows  # ~2 rows of slack after BFD packing
    lengths = rng.integers(64, spec.seq_len + 1, size=count)
    return [rng.integers(0, vocab, size=n, dtype=np.int64) for n in lengths]


def train_flops_per_token(shape, r: int, lengths: list[int]) -> float:
    """Model FLOPs per trained token, counted explicitly (gradient-checkpointing recomputation NOT counted):

        forward  = 2·N·T + 2·P·T + Σ_samples 2·L²·d·layers
        backward = 2·N·T + 4·P·T + 2 · (Σ_samples 2·L²·d·layers)
        total / T

    N: weights of every matmul (all decoder-layer Linears, frozen NF4 but dequantized to bf16 and multiplied as
    such, plus lm_head); T: tokens; P: LoRA parameters (r·(in+out) per target); d = heads·head_dim; L: each packed
    sample's length (varlen attention never crosses samples). A frozen matmul's backward needs the input gradient
    only (one matmul the size of the forward), a trainable one's also its weight gradient (two). Causal attention:
    QKᵀ and PV are 2·L²·d each, half of it masked. Attention backward ≈ 2× its forward.
    """
    tokens = float(sum(lengths))
    n = shape.linear_in_layers + shape.lm_head_params
    p = shape.layers * sum(r * (i + o) for _, i, o in shape.linear_shapes)
    attention_forward = 2.0 * sum(float(L) ** 2 for L in lengths) * shape.heads * shape.head_dim * shape.layers
    return (4 * n * tokens + 6 * p * tokens + 3 * attention_forward) / tokens


def matmul_peak(device: torch.device, size: int = 8192, iters: int = 50) -> dict:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    _sync(device)
    started = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    seconds = time.perf_counter() - started
    return {"size": size, "iters": iters, "tflops": 2 * size**3 * iters / seconds / 1e12}


def multitune(spec: Spec) -> dict:
    from bench.gpu_model import build_random_nf4, shipped_config
    from multitune.recipes.schema import AdapterConfig
    from multitune.trainer.batches import MicroBatchStream, Position, attention_mask_for, plan_micro_batches
    from multitune.trainer.distributed import create_strategy
    from multitune.trainer.lm_loss import token_loss_sum
    from multitune.trainer.loop import accumulate_gradients
    from multitune.trainer.model import prepare_for_training

    torch.manual_seed(spec.seed)
    dist = create_strategy(spec.strategy, dtype="bfloat16", grad_accum=spec.grad_accum, max_grad_norm=1.0,
                           offload_params=spec.offload)
    accelerator = dist.accelerator
    device = accelerator.device
    config = shipped_config(spec.model, **spec.overrides)
    storage = torch.bfloat16 if dist.sharded else torch.uint8  # FSDP/ZeRO-3 shard float storage only
    model = dist.load_model(lambda device, weights: build_random_nf4(config, device, spec.attn, quant_storage=storage,
                                                                     seed=spec.seed), quantized=True)
    _reset_peak(device)  # as for TRL: from after the build, kbit preparation included
    adapter = AdapterConfig(kind="lora", r=spec.r, alpha=2 * spec.r, dropout=0.0, target_modules=LORA_TARGETS)
    model = prepare_for_training(model, True, adapter, spec.gradient_checkpointing)
    model, optimizer = dist.prepare(model, lambda m: torch.optim.AdamW(
        [p for p in m.parameters() if p.requires_grad], lr=spec.lr))
    backend = attn_implementation(dist.unwrap(model).config)
    # The hidden states' dtype: fp32 after kbit preparation, the storage dtype after FSDP2 (no mask under flash-attn).
    mask_dtype = dist.unwrap(model).get_input_embeddings().weight.dtype
    data = InMemorySamples(samples(spec, config.vocab_size))
    plan = plan_micro_batches(data.lengths, spec.seq_len, spec.seq_len, "packed", spec.seed)
    stream = MicroBatchStream(data, plan, spec.seed, accelerator.process_index, accelerator.num_processes)
    batches = stream.iterate(Position())

    def lm_loss(model, batch):
        return token_loss_sum(model, batch, attention_mask_for(batch, mask_dtype, backend))
    model.train()
    tokens, losses = 0.0, []
    for step in range(spec.warmup + spec.steps):
        if step == spec.warmup:
            _sync(device)
            started, tokens = time.perf_counter(), 0.0
        window = [next(batches)[1].to(device) for _ in range(spec.grad_accum)]
        loss_sum, targets, step_tokens = accumulate_gradients(model, window, accelerator, lm_loss, dist)
        dist.clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += step_tokens
        losses.append(loss_sum / max(targets, 1.0))
    _sync(device)
    seconds = time.perf_counter() - started
    info = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "losses": losses,
            "attn": backend, "world_size": accelerator.num_processes, "distributed": dist.describe(model),
            "linear4bit": _count_linear4bit(dist.unwrap(model)), **_memory(device)}
    accelerator.end_training()
    return info


class InMemorySamples:
    """The two things MicroBatchStream reads from a ShardedDataset (lengths, tokens), over in-memory token arrays;
    labels = input ids, so every token is a target (TRL's SFTTrainer trains on all tokens of a plain sequence)."""

    def __init__(self, ids: list[np.ndarray]):
        self.ids = ids
        self.lengths = np.array([len(x) for x in ids])

    def tokens(self, index: int, column: str = "input_ids") -> np.ndarray:
        return self.ids[index]


def trl(spec: Spec) -> dict:
    from datasets import Dataset, disable_progress_bars
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from bench.common import WORK
    from bench.gpu_model import build_random_nf4, shipped_config

    disable_progress_bars()
    torch.manual_seed(spec.seed)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    config = shipped_config(spec.model, **spec.overrides)
    model = build_random_nf4(config, device, spec.attn, seed=spec.seed)
    dataset = Dataset.from_dict({"input_ids": [x.tolist() for x in samples(spec, config.vocab_size)]})
    args = SFTConfig(
        output_dir=str(WORK / "gpu" / "trl"), packing=True, padding_free=True, max_length=spec.seq_len,
        per_device_train_batch_size=1, gradient_accumulation_steps=spec.grad_accum, learning_rate=spec.lr,
        lr_scheduler_type="constant", max_steps=spec.warmup + spec.steps,
        gradient_checkpointing=spec.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=on_gpu, use_cpu=not on_gpu, max_grad_norm=1.0,
        optim="adamw_torch", save_strategy="no", report_to=[], logging_steps=1, dataloader_num_workers=0,
        seed=spec.seed, disable_tqdm=True, include_num_input_tokens_seen="non_padding")
    lora = LoraConfig(r=spec.r, lora_alpha=2 * spec.r, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == spec.warmup:
                _sync(device)
                self.started, self.tokens_at = time.perf_counter(), state.num_input_tokens_seen

        def on_train_end(self, args, state, control, **kwargs):
            _sync(device)
            self.seconds = time.perf_counter() - self.started
            self.tokens = state.num_input_tokens_seen - self.tokens_at

    clock = Clock()
    _reset_peak(device)
    tokenizer = _id_tokenizer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
                         callbacks=[clock])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"seconds": clock.seconds, "tokens": float(clock.tokens), "tokens_per_s": clock.tokens / clock.seconds,
            "losses": losses, "attn": attn_implementation(trainer.model.config),
            "linear4bit": _count_linear4bit(trainer.model), **_memory(device)}


def _id_tokenizer():
    """A two-token tokenizer for TRL, which wants one for its pad and EOS ids; the data are token ids already."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    # Built here rather than loaded: the GPU machine has no hub access and carrying mistral-common (the tiny models'
    # tokenizer) and its dependencies would not fit the 64 MiB the device tool carries.
    vocab = {"<pad>": 0, "</s>": 1}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="</s>")


def _count_linear4bit(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()  # blocks cached while building layer by layer would count as reserved
        torch.cuda.reset_peak_memory_stats(device)


def _memory(device: torch.device) -> dict:
    """Peak GPU memory since the reset after the model was built (its one transient bf16 layer is not in it),
    allocated and reserved by the caching allocator; on CPU the process's peak RSS."""
    from multitune.trainer.memory import peak_memory_gb

    if device.type != "cuda":
        return {"peak_allocated_gib": peak_memory_gb(device), "peak_reserved_gib": None}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def main(spec: Spec) -> dict:
    if spec.system == "matmul_peak":
        return matmul_peak(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return {"multitune": multitune, "trl": trl}[spec.system](spec)


if __name__ == "__main__":
    spec = Spec(**json.loads(sys.argv[1]))
    result = {"spec": asdict(spec), **main(spec)}
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
