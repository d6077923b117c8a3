"""Atomic checkpoints (temporary folder, then rename) of everything an exact resume needs, and finding the newest one.

Our own rather than `accelerator.save_state`: that writes in place (a crash mid-save leaves a half checkpoint
that looks whole) and stores the frozen base weights, which for QLoRA are gigabytes we never change.

Layout per strategy: single/DDP (replicated) → the main rank writes `trainable.safetensors` + `optimizer.pt`;
FSDP2 → `sharded/` via torch.distributed.checkpoint, one file per rank holding that rank's shards of the
trainable weights and their optimizer state; DeepSpeed → `deepspeed/`, its own per-rank partitioned files
(frozen weights excluded). Every rank writes `rng-{rank}.pt`; the folder is renamed into place only when all
ranks are done.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from recipes.errors import InputError

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    index: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    data_hash: str = ""


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: TrainState, keep_last: int,
                    rank: int = 0, barrier=lambda: None, strategy: str = "single") -> Path:
    """Every rank calls this: each writes its RNG state (and its shards when sharded), the main rank (0) the
    rest, then renames the whole. `model` is the wrapped model (DeepSpeed engine, FSDP2 module, DDP)."""
    final = folder / f"step-{state.step}"
    tmp = folder / f".step-{state.step}.tmp"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
        tmp.mkdir()
    barrier()
    try:
        torch.save(rng_state(), tmp / f"rng-{rank}.pt")
        if strategy == "fsdp":
            _save_fsdp2(tmp / "sharded", model, optimizer)
        elif strategy in ("zero2", "zero3"):
            model.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False, exclude_frozen_parameters=True)
        elif rank == 0:
            save_file(trainable_state(_unwrap(model)), str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if rank == 0:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
    finally:
        barrier()
    if rank == 0:
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again after a resume: replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(folder)
        for old in list_checkpoints(folder)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary folders (a save that did not finish) never match."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0, strategy: str = "single") -> TrainState:
    """Restore a checkpoint written under the same strategy (and, when sharded, the same number of ranks)."""
    layout = {"fsdp": "sharded", "zero2": "deepspeed", "zero3": "deepspeed"}.get(strategy, "trainable.safetensors")
    if not (path / layout).exists():
        raise InputError(f"{path}: not written under distributed.strategy={strategy} (no {layout}); "
                         f"resume with the strategy the run was started with")
    if strategy == "fsdp":
        _load_fsdp2(path / "sharded", model, optimizer)
    elif strategy in ("zero2", "zero3"):
        loaded, _ = model.load_checkpoint(str(path), tag="deepspeed", load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise InputError(f"{path}: DeepSpeed could not load its checkpoint (different number of ranks?)")
    else:
        _load_replicated(path, _unwrap(model), optimizer)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / f"rng-{rank}.pt", weights_only=True))
    return TrainState(**json.loads((path / "state.json").read_text()))


def _load_replicated(path: Path, model, optimizer) -> None:
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in weights]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks trainable parameters such as {missing[0]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))


def _fsdp2_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # The frozen (maybe 4-bit) base is reloaded from the model, never saved; loading leaves it alone.
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _save_fsdp2(folder: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_fsdp2_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def _load_fsdp2(folder: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_fsdp2_options())
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_fsdp2_options())


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(_flatten_python_state(random.getstate()))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, *internal, gauss = state["python"]
    random.setstate((version, tuple(internal), None if gauss == -1 else gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flatten_python_state(state) -> list:
    version, internal, gauss = state
    return [version, *internal, -1 if gauss is None else gauss]


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_dir():
            _fsync_tree(path)
            continue
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
