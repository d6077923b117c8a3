"""What differs between strategies (single, DDP, FSDP2, DeepSpeed ZeRO-2/3): process group, wrapping, gradient
sync, clipping and gathering the trainable weights. The loop calls these and stays strategy-agnostic."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

DEEPSPEED = frozenset({"zero2", "zero3"})


def make_accelerator(strategy: str, dtype: str, grad_accum: int, max_grad_norm: float | None,
                     timeout_s: int = 600) -> Accelerator:
    """The process group and device for `strategy`, with the CPU traps of accelerate 1.15 handled explicitly.

    `timeout_s` bounds every collective: a rank whose peer hangs (not dead: a dead peer's closed connection
    fails the collective at once, and the launcher then ends the job) raises after that long instead of
    waiting for torch's default of 30 minutes (gloo) / 10 (NCCL).

    On CPU: DDP/FSDP need accelerate's CPU flag (MULTI_CPU over gloo); DeepSpeed must NOT get it (each rank would
    think it is alone) but needs gloo named explicitly. FSDP is applied by us (`shard_fsdp2`), never by accelerate,
    which on CPU would silently give DDP instead.
    """
    on_cpu = not torch.cuda.is_available()
    timeout = timedelta(seconds=timeout_s)
    handlers = [] if strategy == "single" else [
        InitProcessGroupKwargs(backend="gloo", timeout=timeout) if on_cpu else InitProcessGroupKwargs(timeout=timeout)]
    if strategy in DEEPSPEED:
        plugin = DeepSpeedPlugin(
            zero_stage=2 if strategy == "zero2" else 3,
            gradient_accumulation_steps=grad_accum,
            gradient_clipping=max_grad_norm or 0.0,
            zero3_init_flag=False if strategy == "zero2" else None,  # None: the accelerate config decides
        )
        # We feed DeepSpeed our own token-budget micro-batches (rows vary); its batch size only enters its sanity
        # check (train_batch_size = micro x accumulation x world) and its logging.
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
        # With offload DeepSpeed insists on its own CPU Adam (a C++ op built at first use); the recipe's torch
        # optimizer works too, slower on the CPU side of a GPU run.
        plugin.deepspeed_config["zero_force_ds_cpu_optimizer"] = False
        precision = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "no")
        return Accelerator(deepspeed_plugin=plugin, mixed_precision=precision, kwargs_handlers=handlers)
    if strategy == "fsdp":
        os.environ.pop("ACCELERATE_USE_FSDP", None)  # we shard with fully_shard; accelerate only gives the group
    return Accelerator(cpu=on_cpu, kwargs_handlers=handlers)


@dataclass
class Distributed:
    strategy: str
    accelerator: Accelerator

    @property
    def deepspeed(self) -> bool:
        return self.strategy in DEEPSPEED

    @property
    def sharded(self) -> bool:
        """Parameters are partitioned: every forward (also generation) must run on all ranks together."""
        return self.strategy in ("fsdp", "zero3")

    def loss_factor(self, grad_accum: int) -> float:
        """DeepSpeed divides each micro-batch's loss by its gradient_accumulation_steps; undo it, since our loss
        is already normalised by the whole step's target tokens."""
        return float(grad_accum) if self.deepspeed else 1.0

    def model_loading(self, quantized: bool):
        """Context for `from_pretrained`. ZeRO-3 partitions full/LoRA weights while loading (zero.Init, from the
        config's zero3_init_flag); 4-bit loading needs a device map, which zero.Init refuses, so QLoRA loads
        quantized on each rank and is partitioned by `prepare`."""
        plugin = self.accelerator.state.deepspeed_plugin if self.deepspeed else None
        if plugin is None or not (quantized or not plugin.zero3_init_flag):
            return nullcontext()
        return _without_zero3_init(plugin)

    def prepare(self, model, build_optimizer: Callable):
        """Wrap the model for the strategy and build its optimizer (after sharding, for FSDP2)."""
        if self.strategy == "fsdp":
            model = shard_fsdp2(model, self.accelerator.num_processes)
            return model, build_optimizer(model)
        return self.accelerator.prepare(model, build_optimizer(model))

    def unwrap(self, model):
        return model if self.strategy == "fsdp" else self.accelerator.unwrap_model(model)

    def gradient_sync(self, model, sync: bool):
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
        if self.strategy == "fsdp":
            return _fsdp_sync(model, sync)
        if self.deepspeed:
            return _deepspeed_sync(self.accelerator, model, sync)
        return nullcontext() if sync else self.accelerator.no_sync(model)

    def clip_grad_norm(self, model, max_norm: float | None) -> float:
        """Clip (DeepSpeed clipped inside its step, per its config) and return the global gradient norm."""
        if self.strategy == "fsdp":
            params = [p for p in model.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
        return float(norm) if norm is not None else float("nan")

    def describe(self, model) -> dict:
        """What the run really is (recorded in metrics.json; tests assert it, so a silent fallback shows)."""
        params = list(self.unwrap(model).parameters())
        total = sum(_full_numel(p) for p in params)
        local = sum(_local_numel(p) for p in params)
        inner = model.get_base_model() if self.strategy == "fsdp" and hasattr(model, "get_base_model") else model
        info = {"strategy": self.strategy, "world_size": self.accelerator.num_processes,
                "wrapper": type(inner).__name__, "local_param_fraction": round(local / max(total, 1), 4)}
        if self.strategy == "fsdp":
            info["fsdp_units"] = sum(1 for m in self.unwrap(model).modules() if type(m).__name__.startswith("FSDP"))
        if self.deepspeed:
            info["zero_stage"] = model.zero_optimization_stage()
            info["offload"] = bool(model.zero_cpu_offload())
        return info

    def gather_trainable(self, model) -> dict[str, torch.Tensor]:
        """Full trainable weights, on CPU, named as in the unwrapped model. Collective: every rank must call;
        only the frozen base stays sharded, so this gathers megabytes for LoRA, not the model."""
        unwrapped = self.unwrap(model)
        named = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
        if self.strategy == "fsdp":
            return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu() for n, p in named}
        if self.strategy == "zero3":
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                return {n: p.detach().cpu().clone() for n, p in named}
        return {n: p.detach().cpu() for n, p in named}


def shard_fsdp2(model, world_size: int):
    """FSDP2: one unit per transformer layer (the model's `_no_split_modules`) plus the root; parameters become
    sharded DTensors. The root is the transformers model, not a PEFT wrapper, so `generate` (which bypasses the
    PEFT forward) still gathers the root's weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (world_size,))
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(getattr(inner, "_no_split_modules", None) or [])
    _uniform_float_dtype(model)
    for module in inner.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(inner, mesh=mesh)
    return model


def _uniform_float_dtype(model) -> None:
    """FSDP2 all-gathers a unit's parameters in one buffer: bring float parameters that kbit preparation upcast
    (norms) back to the dtype of the sharded 4-bit storage; trainable LoRA weights keep their own dtype."""
    storage = {p.dtype for p in model.parameters() if type(p).__name__ == "Params4bit"}
    if len(storage) != 1:
        return
    (dtype,) = storage
    for p in model.parameters():
        if not p.requires_grad and p.dtype.is_floating_point and p.dtype != dtype:
            p.data = p.data.to(dtype)


@contextmanager
def _fsdp_sync(model, sync: bool):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        inner.set_requires_gradient_sync(True)


@contextmanager
def _without_zero3_init(plugin):
    """transformers decides on zero.Init from the global DeepSpeed config accelerate registers (whatever the
    plugin's zero3_init_flag says): unregister it while loading, register it again for generation and saving."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


@contextmanager
def _deepspeed_sync(accelerator: Accelerator, model, sync: bool):
    """DeepSpeed steps inside `backward` at an accumulation boundary, which accelerate derives from its own count
    of micro-batches in `accumulate`; ours must line up with it, or DeepSpeed would step mid-window."""
    with accelerator.accumulate(model):
        if accelerator.sync_gradients != sync:
            raise RuntimeError("DeepSpeed accumulation boundary out of step with the micro-batch window")
        yield


def _full_numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # DTensor.numel() is already the global size


def _local_numel(p) -> int:
    if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition
        return p.ds_tensor.numel()
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()
