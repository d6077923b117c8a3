"""Checkpoint round trip in one process, small enough for the unit tier: what is saved is what training continues
from (trainable weights, optimizer and scheduler state, RNG), the frozen base is not saved, and old ones retire."""

from __future__ import annotations

import random

import pytest
import torch

from multitune.trainer.checkpoint import TrainState, list_checkpoints, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.unit


def _setup(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)  # a frozen "base" layer
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler) -> None:
    x = torch.randn(4, 8)  # draws from the RNG the checkpoint restores
    loss = model(x).pow(2).mean() + random.random()  # and from Python's
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_resume_from_a_checkpoint_continues_exactly_like_the_uninterrupted_run(tmp_path):
    model, optimizer, scheduler = _setup(0)
    for _ in range(2):
        _step(model, optimizer, scheduler)
    saved = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=2, data_hash="d"), keep_last=2)
    for _ in range(2):
        _step(model, optimizer, scheduler)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}

    resumed, optimizer2, scheduler2 = _setup(0)  # same frozen base (from the seed), fresh trainable state
    with torch.no_grad():
        resumed[1].weight.zero_()
    torch.manual_seed(123)  # a different RNG state: the checkpoint must bring its own back
    state = load_checkpoint(saved, resumed, optimizer2, scheduler2)
    assert (state.step, state.data_hash) == (2, "d")
    for _ in range(2):
        _step(resumed, optimizer2, scheduler2)
    for name, p in resumed.named_parameters():
        assert torch.equal(p, expected[name]), name
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_only_trainable_weights_are_saved_and_old_checkpoints_retire(tmp_path):
    from safetensors.torch import load_file

    model, optimizer, scheduler = _setup(1)
    for step in (1, 2, 3):
        _step(model, optimizer, scheduler)
        save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=step), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-3"]  # no temporary or retired leftovers
    assert set(load_file(str(tmp_path / "step-3" / "trainable.safetensors"))) == {"1.weight", "1.bias"}
