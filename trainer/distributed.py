"""Distributed strategies: single process, DDP, FSDP2, DeepSpeed ZeRO-2/3, one class each. A strategy owns every
decision that differs between them: the process group, how the model is loaded and wrapped, gradient sync,
clipping, which ranks take part in a model call, gathering the trainable weights, and the checkpoint layout.
The loop names no strategy; a new strategy is one class here (and its name in `STRATEGIES`)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
from safetensors.torch import load_file, save_file

from multitune.compat import fsdp_offloads_to_cpu, without_accelerate_fsdp, without_hf_deepspeed_config
from multitune.recipes.errors import InputError
from multitune.trainer.faults import kill_point


def leave_process_group() -> None:
    """End this rank's part in the job's process group, if it has one.

    Models, DDP reducers and optimizers from the run are collected first, while the interpreter is fully alive:
    left to interpreter shutdown, gloo work objects they hold can be destroyed after the runtime they need, and the
    rank aborts with "terminate called without an active exception" after a run that succeeded (seen once in CI
    at the end of a 2-rank DDP test)."""
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class Strategy:
    """Single process (also the base of the others): the model on one device, nothing partitioned, the main rank
    writes the checkpoint's `trainable.safetensors` + `optimizer.pt`.

    `accelerator` None: a bare single-process strategy (rank 0 of 1), e.g. for saving a checkpoint outside a run.
    """

    name = "single"
    # Parameters are partitioned: every model call (forward, generation) must run on all ranks together.
    sharded = False
    # The engine steps (and clips, per its config) inside backward, and may report no gradient norm.
    steps_in_backward = False
    checkpoint_layout = "trainable.safetensors"  # what a checkpoint written under this strategy holds

    def __init__(self, accelerator: Accelerator | None = None, offload_params: bool = False):
        self.accelerator = accelerator
        self.offload_params = offload_params  # FSDP2 only (validated at the recipe)
        self.load_info: dict = {}  # how this rank built its model: init kind, bytes it held

    @classmethod
    def make_accelerator(cls, dtype: str, grad_accum: int, max_grad_norm: float | None, deepspeed, timeout_s: int):
        """The process group and device. `timeout_s` bounds every collective: a rank whose peer hangs (not dead:
        a dead peer's closed connection fails the collective at once, and the launcher then ends the job) raises
        after that long instead of torch's default of 30 minutes (gloo) / 10 (NCCL). On CPU, accelerate 1.15
        needs its CPU flag for a multi-process (gloo) group."""
        on_cpu = not torch.cuda.is_available()
        handlers = [] if cls.name == "single" else [_process_group_kwargs(timeout_s)]
        return Accelerator(cpu=on_cpu, kwargs_handlers=handlers)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator else 0

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes if self.accelerator else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device if self.accelerator else torch.device("cpu")

    def barrier(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()

    def model_call(self, fn: Callable):
        """`fn()` (a forward pass, an evaluation) on the ranks that must take part: the main one, or all of them
        when the parameters are partitioned (a rank left out would leave the others waiting in a collective).
        Returns its result there, None on ranks that sat out. Only logging and file writing stay on the main rank."""
        return fn() if self.main or self.sharded else None

    def loss_factor(self, grad_accum: int) -> float:
        """What each micro-batch's loss is multiplied by before backward, beyond our own normalisation."""
        return 1.0

    def load_model(self, build: Callable[[torch.device, bool], torch.nn.Module], quantized: bool):
        """The model as this rank should hold it before `prepare`.

        `build(device, weights)` makes the model; weights=False asks for it on the meta device, from the config
        alone (a builder that cannot may load real weights: rank 0's overwrite them when sharding).
        """
        from transformers.integrations import is_deepspeed_zero3_enabled

        weights = self.main or not self.broadcasts_weights()
        with self._model_loading(quantized):
            model = build(self._load_device(quantized), weights)
            init = "meta" if not weights else "zero.Init" if is_deepspeed_zero3_enabled() else "full"
        self.load_info = {"init": init, "bytes": _materialised_bytes(model)}
        return model

    def broadcasts_weights(self) -> bool:
        """Only rank 0 reads the weights; the others get theirs from it when the model is wrapped."""
        return False

    def _load_device(self, quantized: bool) -> torch.device:
        return self.device

    def _model_loading(self, quantized: bool):
        return nullcontext()

    def prepare(self, model, build_optimizer: Callable):
        """Wrap the model for the strategy and build its optimizer."""
        if self.accelerator is None:
            return model, build_optimizer(model)
        return self.accelerator.prepare(model, build_optimizer(model))

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model) if self.accelerator else model

    def gradient_sync(self, model, sync: bool):
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
        return nullcontext() if sync else self.accelerator.no_sync(model)

    def clip_grad_norm(self, model, max_norm: float | None) -> float:
        """Clip and return the global gradient norm (NaN where the engine does not report it)."""
        norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
        return float(norm) if norm is not None else float("nan")

    def describe(self, model) -> dict:
        """What the run really is (recorded in metrics.json; tests assert it, so a silent fallback shows)."""
        params = list(self.unwrap(model).parameters())
        total = sum(_full_numel(p) for p in params)
        local = sum(_local_numel(p) for p in params)
        return {"strategy": self.name, "world_size": self.world_size, "wrapper": type(self._wrapper(model)).__name__,
                "local_param_fraction": round(local / max(total, 1), 4), **self._describe(model, params),
                "load_per_rank": _all_ranks(self.load_info)}

    def _wrapper(self, model):
        return model

    def _describe(self, model, params) -> dict:
        return {}

    def gather_trainable(self, model) -> dict[str, torch.Tensor]:
        """Full trainable weights, on CPU, named as in the unwrapped model. Collective: every rank must call;
        only the frozen base stays sharded, so this gathers megabytes for LoRA, not the model."""
        return {n: p.detach().cpu() for n, p in self.unwrap(model).named_parameters() if p.requires_grad}

    def save_weights(self, folder: Path, model, optimizer, step: int) -> None:
        """This rank's part of a checkpoint's weights and optimizer state for `step`, written into `folder` (which
        exists)."""
        if self.main:
            unwrapped = self.unwrap(model)
            save_file({n: p.detach().cpu().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad},
                      str(folder / "trainable.safetensors"))
            kill_point("checkpoint-weights", step)
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")

    def load_weights(self, folder: Path, model, optimizer) -> None:
        """Restore what `save_weights` wrote. Raises InputError for a checkpoint that does not fit the model."""
        weights = load_file(str(folder / "trainable.safetensors"))
        params = dict(self.unwrap(model).named_parameters())
        missing = [name for name, p in params.items() if p.requires_grad and name not in weights]
        if missing:
            raise InputError(f"{folder}: checkpoint lacks trainable parameters such as {missing[0]}")
        wrong = [name for name, value in weights.items() if name in params and params[name].shape != value.shape]
        if wrong:
            raise InputError(f"{folder}: {wrong[0]} has shape {tuple(weights[wrong[0]].shape)} in the checkpoint but "
                             f"{tuple(params[wrong[0]].shape)} in the model (adapter or model changed)")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(params[name].device))
        optimizer.load_state_dict(load_tensors(folder / "optimizer.pt"))


class DDP(Strategy):
    """DistributedDataParallel (accelerate's `prepare`): every rank holds the whole model, gradients all-reduced;
    replicated state, so the main rank writes the checkpoint as under a single process."""

    name = "ddp"


class FSDP2(Strategy):
    """FSDP2 (torch's `fully_shard`, applied by us: accelerate on CPU would silently give DDP): parameters,
    gradients and optimizer states sharded per decoder layer; optionally offloaded to CPU RAM (`CPUOffloadPolicy`).
    Checkpoints: `sharded/`, torch.distributed.checkpoint, one file per rank with its shards of the trainable
    weights and their optimizer state (the frozen base is reloaded from the model, never saved)."""

    name = "fsdp"
    sharded = True
    checkpoint_layout = "sharded"

    @classmethod
    def make_accelerator(cls, dtype, grad_accum, max_grad_norm, deepspeed, timeout_s):
        without_accelerate_fsdp()  # we shard with fully_shard; accelerate only gives the process group
        return super().make_accelerator(dtype, grad_accum, max_grad_norm, deepspeed, timeout_s)

    def broadcasts_weights(self) -> bool:
        """More than one rank: only rank 0 reads the weights (and, for QLoRA, quantizes them); the others build
        the same model on the meta device and get their shard (and the 4-bit weights' quantization state) from
        rank 0 after sharding (`shard_fsdp2`)."""
        return self.world_size > 1

    def _load_device(self, quantized: bool) -> torch.device:
        # fully_shard moves each unit to the device, one at a time; offloaded shards stay in CPU RAM: either way
        # the whole model is never on the accelerator.
        if self.broadcasts_weights() or self.offload_params:
            return torch.device("cpu")
        return self.device

    def prepare(self, model, build_optimizer):
        model = shard_fsdp2(model, self.world_size, self.broadcasts_weights(), self.offload_params)
        return model, build_optimizer(model)  # after sharding: the optimizer sees the shards, on their device

    def unwrap(self, model):
        return model

    @contextmanager
    def gradient_sync(self, model, sync: bool):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)

    def clip_grad_norm(self, model, max_norm):
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _wrapper(self, model):
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _describe(self, model, params) -> dict:
        modules = list(self.unwrap(model).modules())
        return {"fsdp_units": sum(1 for m in modules if type(m).__name__.startswith("FSDP")),
                "offloaded_units": sum(fsdp_offloads_to_cpu(m) for m in modules),
                "param_devices": sorted({str(_local(p).device) for p in params})}

    def gather_trainable(self, model):
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                for n, p in model.named_parameters() if p.requires_grad}

    def save_weights(self, folder, model, optimizer, step):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer, options=_fsdp2_state_options())
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder / "sharded"))

    def load_weights(self, folder, model, optimizer):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(model, optimizer, options=_fsdp2_state_options())
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(folder / "sharded"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_fsdp2_state_options())


class DeepSpeed(Strategy):
    """DeepSpeed ZeRO-2 (optimizer states + gradients partitioned) or ZeRO-3 (parameters too), through accelerate.
    Checkpoints: `deepspeed/`, its own per-rank partitioned files (frozen weights excluded)."""

    name = "zero2"
    stage = 2
    steps_in_backward = True
    checkpoint_layout = "deepspeed"

    @classmethod
    def make_accelerator(cls, dtype, grad_accum, max_grad_norm, deepspeed, timeout_s):
        """Stage and offload come from `deepspeed` (the recipe's accelerate config), every field explicit, so
        nothing falls back to the launcher's environment. On CPU DeepSpeed must NOT get accelerate's CPU flag
        (each rank would think it is alone) but needs gloo named explicitly."""
        from multitune.recipes.accelerate_config import DeepSpeedSettings

        deepspeed = deepspeed or DeepSpeedSettings(zero_stage=cls.stage)
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
        return Accelerator(deepspeed_plugin=plugin, mixed_precision=precision,
                           kwargs_handlers=[_process_group_kwargs(timeout_s)])

    def loss_factor(self, grad_accum: int) -> float:
        """DeepSpeed divides each micro-batch's loss by its gradient_accumulation_steps; undo it, since our loss
        is already normalised by the whole step's target tokens."""
        return float(grad_accum)

    def _model_loading(self, quantized: bool):
        """ZeRO-3 partitions full/LoRA weights while loading (zero.Init, from the config's zero3_init_flag);
        4-bit loading needs a device map, which zero.Init refuses, so QLoRA loads quantized on each rank and is
        partitioned by `prepare`."""
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None or not (quantized or not plugin.zero3_init_flag):
            return nullcontext()
        return without_hf_deepspeed_config(plugin)

    @contextmanager
    def gradient_sync(self, model, sync: bool):
        """DeepSpeed steps inside `backward` at an accumulation boundary, which accelerate derives from its own
        count of micro-batches in `accumulate`; ours must line up with it, or DeepSpeed would step mid-window."""
        with self.accelerator.accumulate(model):
            if self.accelerator.sync_gradients != sync:
                raise RuntimeError("DeepSpeed accumulation boundary out of step with the micro-batch window")
            yield

    def _describe(self, model, params) -> dict:
        return {"zero_stage": model.zero_optimization_stage(), "offload": bool(model.zero_cpu_offload())}

    def save_weights(self, folder, model, optimizer, step):
        model.save_checkpoint(str(folder), tag="deepspeed", save_latest=False, exclude_frozen_parameters=True)

    def load_weights(self, folder, model, optimizer):
        loaded, _ = model.load_checkpoint(str(folder), tag="deepspeed", load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise InputError(f"{folder}: DeepSpeed could not load its checkpoint (different number of ranks?)")


class ZeRO3(DeepSpeed):
    name = "zero3"
    stage = 3
    sharded = True

    def gather_trainable(self, model):
        import deepspeed

        named = [(n, p) for n, p in self.unwrap(model).named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in named}


def _process_group_kwargs(timeout_s: int) -> InitProcessGroupKwargs:
    timeout = timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        return InitProcessGroupKwargs(timeout=timeout)
    return InitProcessGroupKwargs(backend="gloo", timeout=timeout)


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Strategy, DDP, FSDP2, DeepSpeed, ZeRO3)}


def create_strategy(name: str, *, dtype: str = "float32", grad_accum: int = 1, max_grad_norm: float | None = None,
                    deepspeed=None, timeout_s: int = 600, offload_params: bool = False) -> Strategy:
    """The strategy `distributed.strategy` names, with its process group joined. `deepspeed`: the
    `DeepSpeedSettings` of the recipe's accelerate config (ZeRO only)."""
    cls = STRATEGIES[name]
    return cls(cls.make_accelerator(dtype, grad_accum, max_grad_norm, deepspeed, timeout_s), offload_params)


def load_tensors(path: Path):
    """torch.load restricted to tensors and plain containers: a checkpoint file is never arbitrary pickle.
    Raises InputError for a file that holds more."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(f"{path}: refused to load, it holds more than tensors and plain values "
                         f"({' '.join(str(exc).split())[:120]})") from None


def shard_fsdp2(model, world_size: int, from_rank0: bool = False, offload: bool = False):
    """FSDP2: one unit per transformer layer (the model's `_no_split_modules`) plus the root; parameters become
    sharded DTensors. The root is the transformers model, not a PEFT wrapper, so `generate` (which bypasses the
    PEFT forward) still gathers the root's weights.

    from_rank0: only rank 0 holds real weights (the others are on the meta device). The others allocate just
    their shards, then torch's supported FSDP2 path sends rank 0's full state dict one tensor at a time, each
    rank keeping its slice; buffers (not sharded, some not in the state dict, e.g. rotary inv_freq) are sent
    whole. 4-bit weights are sharded like any other parameter (their packed storage is a float `quant_storage`
    tensor); their quantization state is not a parameter and not sharded: it is sent whole
    (`broadcast_quant_states`).

    4-bit models: every `Linear4bit`'s quantization state ends on the device the layer computes on (the GPU also
    under offload, where only the parameters stay in CPU RAM; it is megabytes per layer).

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
    full_state = _parameters_and_buffers(model) if from_rank0 and dist.get_rank() == 0 else {}
    for module in inner.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh, offload_policy=policy)
    fully_shard(inner, mesh=mesh, offload_policy=policy)
    if from_rank0:
        if dist.get_rank() != 0:
            model.to_empty(device="cpu" if offload else device)
        set_model_state_dict(model, full_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full_state
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
        broadcast_quant_states(model, torch.device(device, torch.cuda.current_device()) if device == "cuda"
                               else torch.device(device))
    elif torch.cuda.is_available():
        for module in _linear4bit_modules(model):
            module.quant_state.to(torch.device("cuda", torch.cuda.current_device()))
    return model


def broadcast_quant_states(model, device: torch.device) -> None:
    """Give every rank rank 0's quantization state of each `Linear4bit` (in module order; the same on every rank,
    built from one config): absmax (uint8 per 64 weights under double quant, else fp32), the NF4 code (16 fp32),
    and under double quant the offset (fp32 scalar), nested absmax (fp32 per 256 absmax) and nested code (256
    fp32). Collective. Ranks > 0 allocate each tensor on `device` (the device the layer computes on, which the
    process group can send to) in the shape of their own state (meta templates from `quantize_on_meta`) and
    receive rank 0's values; the non-tensor fields (quant type, block sizes, dtypes, the weight's shape) are
    compared with rank 0's first.

    Raises RuntimeError when a rank's 4-bit layers or their states' fields differ from rank 0's (its model was
    built from another config or library version); nothing is sent then.
    """
    import torch.distributed as dist

    modules = _linear4bit_modules(model)
    layout = [_quant_state_layout(m.quant_state) for m in modules]
    theirs = [layout]
    dist.broadcast_object_list(theirs, src=0)
    mismatch = next((i for i, (a, b) in enumerate(zip(layout, theirs[0])) if a != b), None)
    if len(layout) != len(theirs[0]) or mismatch is not None:
        where = f"layer {mismatch}: {layout[mismatch]} vs rank 0's {theirs[0][mismatch]}" if mismatch is not None \
            else f"{len(layout)} 4-bit layers vs rank 0's {len(theirs[0])}"
        raise RuntimeError(f"rank {dist.get_rank()}: 4-bit model differs from rank 0's ({where})")
    rank0 = dist.get_rank() == 0
    for module in modules:
        state = module.quant_state
        tensors = _quant_state_tensors(state)
        received = {}
        for name, tensor in tensors.items():
            value = tensor.to(device) if rank0 else torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
            dist.broadcast(value, src=0)
            received[name] = value
        state.absmax, state.code = received["absmax"], received["code"]
        if state.nested:
            state.offset, state.state2.absmax, state.state2.code = (
                received["offset"], received["nested_absmax"], received["nested_code"])
        if type(module.weight).__name__ == "Params4bit":  # not yet replaced by FSDP's DTensor (not sharded)
            module.weight.quant_state = state


def _linear4bit_modules(model) -> list:
    return [m for m in model.modules() if type(m).__name__ == "Linear4bit" and getattr(m, "quant_state", None)]


def _quant_state_tensors(state) -> dict[str, torch.Tensor]:
    tensors = {"absmax": state.absmax, "code": state.code}
    if state.nested:
        tensors.update(offset=state.offset, nested_absmax=state.state2.absmax, nested_code=state.state2.code)
    return tensors


def _quant_state_layout(state) -> tuple:
    """Everything about a QuantState but its values: what must agree across ranks before values are sent."""
    shapes = tuple((name, tuple(t.shape), str(t.dtype)) for name, t in _quant_state_tensors(state).items())
    nested = (state.state2.blocksize, str(state.state2.dtype)) if state.nested else None
    return (state.quant_type, state.blocksize, str(state.dtype), tuple(state.shape), nested, shapes)


def _parameters_and_buffers(model) -> dict[str, torch.Tensor]:
    """The model's state dict without what bitsandbytes adds for saving 4-bit layers (quant-state entries such as
    `weight.absmax`: no parameter or buffer loads them; they are sent by `broadcast_quant_states`)."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {
        n for n, _ in model.named_buffers(remove_duplicate=False)}
    return {k: v for k, v in model.state_dict().items() if k in names}


def _local(p):
    return p.to_local() if hasattr(p, "to_local") else p


def _uniform_float_dtype(model) -> None:
    """FSDP2 all-gathers a unit's parameters in one buffer: bring frozen float parameters of another dtype (an upcast
    base's fp32 norms, `keeps_fp32_outside_4bit`) to the dtype of the sharded 4-bit storage; trainable LoRA weights
    keep their own dtype."""
    storage = {p.dtype for p in model.parameters() if type(p).__name__ == "Params4bit"}
    if len(storage) != 1:
        return
    (dtype,) = storage
    for p in model.parameters():
        if not p.requires_grad and p.dtype.is_floating_point and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _fsdp2_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # The frozen (maybe 4-bit) base is reloaded from the model, never saved; loading leaves it alone.
    return StateDictOptions(ignore_frozen_params=True, strict=False)


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
