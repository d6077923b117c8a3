"""Atomic checkpoints (temporary folder, then rename) of everything an exact resume needs, and finding the newest one.

Our own rather than `accelerator.save_state`: that writes in place (a crash mid-save leaves a half checkpoint
that looks whole) and stores the frozen base weights, which for QLoRA are gigabytes we never change.

Layout per strategy: single/DDP (replicated) → the main rank writes `trainable.safetensors` + `optimizer.pt`;
FSDP2 → `sharded/` via torch.distributed.checkpoint, one file per rank holding that rank's shards of the
trainable weights and their optimizer state; DeepSpeed → `deepspeed/`, its own per-rank partitioned files
(frozen weights excluded). Every rank writes `rng-{rank}.pt` last (its "done" mark) and the main rank
`state.json` last of all; the folder is fsynced and renamed into place only when every rank's mark is there.
Old checkpoints are retired by renaming them out of the `step-N` namespace before deleting them, so a process
killed at any moment leaves only complete `step-N` folders (plus dot-folders the next save clears away).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from multitune.recipes.errors import InputError, RunStopped, is_disk_full
from multitune.trainer.distributed import Strategy, load_tensors
from multitune.trainer.faults import kill_point

STEP_DIR = re.compile(r"^step-(\d+)$")
LEFTOVER = re.compile(r"^\.step-\d+\.(tmp|del)$")  # a save or a deletion that was killed

# Recipe keys whose change makes a checkpoint mean something else although no trainable shape changes (the base
# and its precision, the LoRA scaling, the data order, the optimizer state, the strategy's layout): refused unless
# --force-resume. A change of trainable shapes (adapter.r, its target modules or layers, process.embed_dim, the
# backbone, ...) is found by comparing the parameter shapes themselves (`shape_problems`) and never forced, since
# such a checkpoint cannot be loaded. The others (lr, max_steps, eval, checkpoint, tracking, ...) may change.
RESUME_KEYS = ("task", "model.name_or_path", "model.gguf_file", "model.tiny", "model.dtype", "model.quantization",
               "model.double_quant", "model.compute_dtype", "model.quant_storage", "adapter.alpha",
               "adapter.dropout", "data.packing", "data.group_by_length", "train.micro_batch_tokens",
               "train.grad_accum", "train.optimizer", "train.seed", "distributed.strategy")
# Recorded in state.json beside RESUME_KEYS only to name the recipe change behind a change of shapes.
EXPLAINING_KEYS = ("model", "adapter", "process")


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    index: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    data_hash: str = ""
    recipe: dict[str, Any] = field(default_factory=dict)  # resume_fingerprint of the recipe that wrote it
    # name → shape of every trainable (saved) parameter, as in the unwrapped model (`trainable_shapes`)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    nonfinite_skips: int = 0  # steps skipped for a NaN/inf loss or gradient (train.nonfinite=skip)


def trainable_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """Name → full shape of each trainable parameter of the unwrapped model (what a checkpoint saves). Call it
    before wrapping: under ZeRO-3 a partitioned parameter reports its full shape as `ds_shape`."""
    return {name: list(getattr(p, "ds_shape", None) or p.shape) for name, p in model.named_parameters()
            if p.requires_grad}


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: TrainState, keep_last: int,
                    strategy: Strategy | None = None) -> Path:
    """Every rank calls this: each writes its part of the weights (as `strategy` lays them out) and its RNG state,
    the main rank the rest, then renames the whole. `model` is the wrapped model (DeepSpeed engine, FSDP2 module,
    DDP). `strategy` None: a single process. Raises RunStopped (one line) when the disk is full or a rank did not
    finish; the earlier checkpoints are kept either way."""
    strategy = strategy or Strategy()
    rank = strategy.rank
    final = folder / f"step-{state.step}"
    tmp = folder / f".step-{state.step}.tmp"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in [p for p in folder.iterdir() if LEFTOVER.match(p.name)]:
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
    strategy.barrier()
    error = None
    try:
        strategy.save_weights(tmp, model, optimizer, state.step)
        torch.save(rng_state(), tmp / f"rng-{rank}.pt")
        if rank == 0:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks are released
        error = exc
    strategy.barrier()
    if error is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_failure(error, folder, state.step) from error
    if rank == 0:
        missing = [r for r in range(strategy.world_size) if not (tmp / f"rng-{r}.pt").is_file()]
        if missing:
            raise RunStopped(f"checkpoint step-{state.step}: rank {missing[0]} did not finish writing it; "
                             f"not saved, earlier checkpoints kept")
        _fsync_tree(tmp)
        kill_point("checkpoint-written", state.step)
        if final.exists():  # the same step saved again after a resume: retire the old copy first
            _retire(final)
        os.rename(tmp, final)
        _fsync_dir(folder)
        kill_point("checkpoint-renamed", state.step)
        for old in list_checkpoints(folder)[:-keep_last]:
            _retire(old)
    strategy.barrier()
    return final


def _retire(path: Path) -> None:
    """Delete a checkpoint so that no moment of the deletion leaves a half `step-N` folder behind."""
    doomed = path.with_name(f".{path.name}.del")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    kill_point("checkpoint-retired", int(path.name.split("-")[1]))
    shutil.rmtree(doomed, ignore_errors=True)


def _save_failure(error: Exception, folder: Path, step: int) -> Exception:
    """A full disk becomes one clear line; anything else stays what it was (a bug to see in full)."""
    full = is_disk_full(error)
    if not full:
        try:  # torch.save reports a short write only as an internal error ("unexpected pos ...")
            full = shutil.disk_usage(folder).free < 1 << 20
        except OSError:
            full = False
    if not full:
        return error
    kept = [p.name for p in list_checkpoints(folder)]
    return RunStopped(f"checkpoint step-{step} not saved: no space left on the device of {folder} "
                      f"({shutil.disk_usage(folder).free} bytes free); "
                      f"{'kept ' + kept[-1] if kept else 'no earlier checkpoint'}, nothing half-written")


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary and retired folders (dot-names) never match."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def read_state(path: Path) -> TrainState:
    return TrainState(**json.loads((path / "state.json").read_text()))


def resume_fingerprint(recipe) -> dict[str, Any]:
    """The recipe's RESUME_KEYS and EXPLAINING_KEYS as flat `section.key: value` pairs (stored in each
    checkpoint's state.json)."""
    from multitune.trainer.tracking import flatten

    flat = flatten(recipe.model_dump(mode="json"))
    return {key: value for key, value in flat.items()
            if any(key == k or key.startswith(k + ".") for k in (*RESUME_KEYS, *EXPLAINING_KEYS))}


def checkpoint_to_resume(folder: Path, fingerprint: dict[str, Any], data_hash: str,
                         force: bool) -> tuple[Path, list[str]]:
    """The newest complete checkpoint and what no longer matches it; a mismatch is refused unless `force`."""
    found = list_checkpoints(folder)
    if not found:
        raise InputError(f"output_dir {folder.parent}: no complete checkpoint to resume from")
    problems = resume_problems(read_state(found[-1]), fingerprint, data_hash)
    if problems and not force:
        raise InputError(f"{found[-1]}: cannot resume, {'; '.join(problems)}: start a new run, "
                         f"or pass --force-resume to resume anyway")
    return found[-1], problems


def resume_problems(state: TrainState, fingerprint: dict[str, Any], data_hash: str) -> list[str]:
    """Why a checkpoint does not fit the current recipe and data (empty: it does); shapes aside."""
    problems = []
    if state.data_hash != data_hash:
        problems.append(f"data changed (manifest hash {state.data_hash[:12]} != {data_hash[:12]})")
    return problems + _changed_keys(state.recipe, fingerprint, RESUME_KEYS)


def _changed_keys(recorded: dict[str, Any], current: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
    if not recorded:  # checkpoints written before fingerprints existed carry none
        return []
    keys = [k for k in sorted(set(recorded) | set(current)) if any(k == s or k.startswith(s + ".") for s in sections)]
    return [f"{key} changed ({recorded.get(key)!r} -> {current.get(key)!r})"
            for key in keys if recorded.get(key) != current.get(key)]


def check_shapes(path: Path, shapes: dict[str, list[int]], fingerprint: dict[str, Any]) -> None:
    """Raise InputError (whatever --force-resume says: such a checkpoint cannot be loaded) when the trainable
    parameters of the model about to resume (`shapes`, from `trainable_shapes`) differ in name or shape from the
    checkpoint's at `path`; the line names the first such parameter and the recipe keys that changed."""
    problems = shape_problems(checkpoint_shapes(path), shapes)
    if not problems:
        return
    changed = _changed_keys(read_state(path).recipe, fingerprint, EXPLAINING_KEYS)
    because = f" ({'; '.join(changed)})" if changed else ""
    more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
    raise InputError(f"{path}: cannot resume, the trainable parameters changed shape{because}: {problems[0]}{more}; "
                     f"their saved values cannot be loaded into other shapes, not even with --force-resume: start a "
                     f"new run, or resume with the settings the checkpoint was written with")


def shape_problems(saved: dict[str, list[int]] | None, current: dict[str, list[int]]) -> list[str]:
    """Each trainable parameter whose shape differs, or that only one side has (empty: they match; `saved` None:
    the checkpoint records no shapes, nothing to compare)."""
    if saved is None:
        return []
    problems = []
    for name in sorted(set(saved) | set(current)):
        if name not in current:
            problems.append(f"{name} is in the checkpoint but not a trainable parameter of the model")
        elif name not in saved:
            problems.append(f"{name} {tuple(current[name])} is trainable in the model but not in the checkpoint")
        elif list(saved[name]) != list(current[name]):
            problems.append(f"{name} has shape {tuple(saved[name])} in the checkpoint but {tuple(current[name])} "
                            f"in the model")
    return problems


def checkpoint_shapes(path: Path) -> dict[str, list[int]] | None:
    """The trainable shapes a checkpoint was written with: from its state.json, or, for checkpoints written before
    state.json recorded them, from the header of its replicated `trainable.safetensors`; None when neither has
    them."""
    state = read_state(path)
    if state.shapes:
        return state.shapes
    if (path / "trainable.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(path / "trainable.safetensors"), framework="pt") as handle:
            return {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
    return None


def load_checkpoint(path: Path, model, optimizer, scheduler, strategy: Strategy | None = None) -> TrainState:
    """Restore a checkpoint written under the same strategy (and, when sharded, the same number of ranks).
    Raises InputError for one written under another strategy, or that does not fit the model."""
    strategy = strategy or Strategy()
    if not (path / strategy.checkpoint_layout).exists():
        raise InputError(f"{path}: not written under distributed.strategy={strategy.name} (no "
                         f"{strategy.checkpoint_layout}); resume with the strategy the run was started with")
    strategy.load_weights(path, model, optimizer)
    scheduler.load_state_dict(load_tensors(path / "scheduler.pt"))
    set_rng_state(load_tensors(path / f"rng-{strategy.rank}.pt"))
    return read_state(path)


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
