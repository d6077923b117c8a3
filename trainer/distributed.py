"""What differs between strategies (single, DDP, FSDP2, DeepSpeed ZeRO-2/3): process group, wrapping, gradient
sync, clipping and gathering the trainable weights. The loop calls these and stays strategy-agnostic."""

from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

from multitune.compat import fsdp_offloads_to_cpu, without_accelerate_fsdp, without_hf_deepspeed_config
from multitune.recipes.accelerate_config import DeepSpeedSettings

DEEPSPEED = frozenset({"zero2", "zero3"})


def leave_process_group() -> None:
    """End this rank's part in the job's process group, if it has one.

    Models, DDP reducers and optimizers from the run are collected first, while the interpreter is fully alive:
    left to interpreter shutdown, gloo work objects they hold can be destroyed after the runtime they need, and the
    rank aborts with "terminate called without an active exception" after a run that succeeded (seen once in CI
    at the end of a 2-rank DDP test)."""
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def make_accelerator(strategy: str, dtype: str, grad_accum: int, max_grad_norm: float | None,
                     deepspeed: DeepSpeedSettings | None = None, timeout_s: int = 600) -> Accelerator:
    """The process group and device for `strategy`, with the CPU traps of accelerate 1.15 handled explicitly.

    `timeout_s` bounds every collective: a rank whose peer hangs (not dead: a dead peer's closed connection
    fails the collective at once, and the launcher then ends the job) raises after that long instead of
    waiting for torch's default of 30 minutes (gloo) / 10 (NCCL).

    On CPU: DDP/FSDP need accelerate's CPU flag (MULTI_CPU over gloo); DeepSpeed must NOT get it (each rank would
    think it is alone) but needs gloo named explicitly. FSDP is applied by us (`shard_fsdp2`), never by accelerate,
    which on CPU would silently give DDP instead. DeepSpeed's stage and offload come from `deepspeed` (the
    recipe's accelerate config), every field explicit, so nothing falls back to the launcher's environment.
    """
    on_cpu = not torch.cuda.is_available()
    timeout = timedelta(seconds=timeout_s)
    handlers = [] if strategy == "single" else [
        InitProcessGroupKwargs(backend="gloo", timeout=timeout) if on_cpu else InitProcessGroupKwargs(timeout=timeout)]
    if strategy in DEEPSPEED:
        deepspeed = deepspeed or DeepSpeedSettings(zero_stage=int(strategy[-1]))
        plugin = DeepSpeedPlugin(
            zero_stage=deepspeed.zero_stage,
            gradient_accumulation_steps=grad_accum,
            gradient_clipping=max_grad_norm or 0.0,
            offload_optimizer_device="cpu" if deepspeed.offload_optimizer else "none",
            offload_param_device="cpu" if deepspeed.offload_param else "none",
            zero3_init_flag=deepspeed.zero3_init,
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
        without_accelerate_fsdp()  # we shard with fully_shard; accelerate only gives the process group
    return Accelerator(cpu=on_cpu, kwargs_handlers=handlers)


@dataclass
class Distributed:
    strategy: str
    accelerator: Accelerator
    # FSDP2 only: sharded parameters (and so their gradients and optimizer states) live in CPU RAM between uses.
    offload_params: bool = False
    load_info: dict = field(default_factory=dict)  # how this rank built its model: init kind, bytes it held

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

    def broadcasts_weights(self, quantized: bool) -> bool:
        """FSDP2 full/LoRA: only rank 0 reads the weights; the others build the model on the meta device and get
        their shard from rank 0 after sharding. (4-bit weights cannot be built without reading them: under QLoRA
        every rank quantizes while loading, one weight at a time, and holds the 4-bit model until sharding.)"""
        return self.strategy == "fsdp" and not quantized and self.accelerator.num_processes > 1

    def load_model(self, build: Callable[[torch.device, bool], torch.nn.Module], quantized: bool):
        """The model as this rank should hold it before `prepare`, without every rank holding all of it: meta on
        FSDP2 ranks other than 0 (see `broadcasts_weights`), partitioned while loading under ZeRO-3 (zero.Init).

        `build(device, weights)` makes the model; weights=False asks for it on the meta device, from the config
        alone (a builder that cannot may load real weights: rank 0's overwrite them when sharding).
        """
        rank0 = self.accelerator.process_index == 0
        device = self.accelerator.device
        # fully_shard moves each unit to the device, one at a time; offloaded shards stay in CPU RAM: either way the
        # whole model is never on the accelerator.
        if self.broadcasts_weights(quantized) or self.offload_params:
            device = torch.device("cpu")
        with self._model_loading(quantized):
            from transformers.integrations import is_deepspeed_zero3_enabled

            weights = rank0 or not self.broadcasts_weights(quantized)
            model = build(device, weights)
            init = "meta" if not weights else "zero.Init" if is_deepspeed_zero3_enabled() else "full"
        self.load_info = {"init": init, "bytes": _materialised_bytes(model)}
        return model

    def _model_loading(self, quantized: bool):
        """Context for `from_pretrained`. ZeRO-3 partitions full/LoRA weights while loading (zero.Init, from the
        config's zero3_init_flag); 4-bit loading needs a device map, which zero.Init refuses, so QLoRA loads
        quantized on each rank and is partitioned by `prepare`."""
        plugin = self.accelerator.state.deepspeed_plugin if self.deepspeed else None
        if plugin is None or not (quantized or not plugin.zero3_init_flag):
            return nullcontext()
        return without_hf_deepspeed_config(plugin)

    def prepare(self, model, build_optimizer: Callable):
        """Wrap the model for the strategy and build its optimizer (after sharding, for FSDP2)."""
        if self.strategy == "fsdp":
            quantized = any(type(p).__name__ == "Params4bit" for p in model.parameters())
            model = shard_fsdp2(model, self.accelerator.num_processes, self.broadcasts_weights(quantized),
                                self.offload_params)
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
            info["offloaded_units"] = sum(fsdp_offloads_to_cpu(m) for m in self.unwrap(model).modules())
            info["param_devices"] = sorted({str(_local(p).device) for p in params})
        if self.deepspeed:
            info["zero_stage"] = model.zero_optimization_stage()
            info["offload"] = bool(model.zero_cpu_offload())
        info["load_per_rank"] = _all_ranks(self.load_info)
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


def shard_fsdp2(model, world_size: int, from_rank0: bool = False, offload: bool = False):
    """FSDP2: one unit per transformer layer (the model's `_no_split_modules`) plus the root; parameters become
    sharded DTensors. The root is the transformers model, not a PEFT wrapper, so `generate` (which bypasses the
    PEFT forward) still gathers the root's weights.

    from_rank0: only rank 0 holds real weights (the others are on the meta device). The others allocate just
    their shards, then torch's supported FSDP2 path sends rank 0's full state dict one tensor at a time, each
    rank keeping its slice; buffers (not sharded, some not in the state dict, e.g. rotary inv_freq) are sent
    whole.

    offload: torch's CPUOffloadPolicy on every unit: sharded parameters live in CPU RAM (pinned on a GPU machine),
    each unit is copied to the device for its forward and backward, gradients are reduced to CPU and the optimizer
    steps there (it is built after sharding, on the parameters' device).
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (world_size,))
    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(getattr(inner, "_no_split_modules", None) or [])
    _uniform_float_dtype(model)
    full_state = model.state_dict() if from_rank0 and dist.get_rank() == 0 else {}
    for module in inner.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh, offload_policy=policy)
    fully_shard(inner, mesh=mesh, offload_policy=policy)
    if from_rank0:
        if dist.get_rank() != 0:
            model.to_empty(device="cpu" if offload else device)
        set_model_state_dict(model, full_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    return model


def _local(p):
    return p.to_local() if hasattr(p, "to_local") else p


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
def _deepspeed_sync(accelerator: Accelerator, model, sync: bool):
    """DeepSpeed steps inside `backward` at an accumulation boundary, which accelerate derives from its own count
    of micro-batches in `accumulate`; ours must line up with it, or DeepSpeed would step mid-window."""
    with accelerator.accumulate(model):
        if accelerator.sync_gradients != sync:
            raise RuntimeError("DeepSpeed accumulation boundary out of step with the micro-batch window")
        yield


def _materialised_bytes(model) -> int:
    """Bytes of parameter storage this rank really holds (meta: none; ZeRO-3: its partition)."""
    total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            total += p.ds_tensor.numel() * p.ds_tensor.element_size()
        elif not p.is_meta:
            total += p.numel() * p.element_size()
    return total


def _all_ranks(value) -> list:
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def _full_numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # DTensor.numel() is already the global size


def _local_numel(p) -> int:
    if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition
        return p.ds_tensor.numel()
    return _local(p).numel()
