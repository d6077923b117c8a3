"""In one process: a stop signal mid-run ends the loop at a step boundary with a complete checkpoint (even with
periodic checkpoints off), restores the previous handlers, and `--resume` continues to the uninterrupted losses."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from conftest import recipe_dict


def step_losses(run_dir):
    path = run_dir / "log.jsonl"
    if not path.exists():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {e["step"]: e["loss"] for e in lines if "eval" not in e}


def signal_at_step(run_dir, step: int, signum: int) -> threading.Thread:
    def watch():
        deadline = time.time() + 120
        while len(step_losses(run_dir)) < step and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signum)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_signal_checkpoints_the_current_step_and_resume_is_exact(tmp_path, tiny_model_dir):
    from multitune.recipes.loader import validate_recipe
    from multitune.trainer.loop import train
    from multitune.trainer.preemption import Preempted

    def recipe(name):
        return validate_recipe(recipe_dict(tmp_path / name, tiny_model_dir, train={"max_steps": 8},
                                           checkpoint={"every_steps": None}))

    full = recipe("full")
    train(full)
    stopped = recipe("stopped")
    signal_at_step(stopped.output_path, 2, signal.SIGUSR1)
    with pytest.raises(Preempted) as caught:
        train(stopped)
    assert caught.value.signum == signal.SIGUSR1 and 2 <= caught.value.step < 8
    assert caught.value.checkpoint.name == f"step-{caught.value.step}" and caught.value.checkpoint.is_dir()
    assert sorted(step_losses(stopped.output_path)) == list(range(1, caught.value.step + 1))
    assert not (stopped.output_path / "adapter").exists()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers are the loop's only while it runs

    train(stopped, resume=True)
    assert step_losses(stopped.output_path) == pytest.approx(step_losses(full.output_path), abs=1e-5)
    assert json.loads((stopped.output_path / "metrics.json").read_text())["steps"] == 8
