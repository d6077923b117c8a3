"""Atomic checkpoints (temporary folder, then rename) of everything an exact resume needs, and finding the newest one.

Our own rather than `accelerator.save_state`: that writes in place (a crash mid-save leaves a half checkpoint
that looks whole) and stores the frozen base weights, which for QLoRA are gigabytes we never change.
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
                    rank: int = 0, barrier=lambda: None) -> Path:
    """Every rank calls this: each writes its own RNG state, the main rank (0) the rest, then renames the whole."""
    final = folder / f"step-{state.step}"
    tmp = folder / f".step-{state.step}.tmp"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
        tmp.mkdir()
    barrier()
    try:
        torch.save(rng_state(), tmp / f"rng-{rank}.pt")
        if rank == 0:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
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


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> TrainState:
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in weights]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks trainable parameters such as {missing[0]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / f"rng-{rank}.pt", weights_only=True))
    return TrainState(**json.loads((path / "state.json").read_text()))


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
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
