"""Faults survived: kill -9 while a checkpoint is written, a full disk, NaN/inf losses, a rank dying in a 2-process
run, and a resume whose data or recipe no longer fits its checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, recipe_dict, write_recipe

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def prep_cache(tmp_path_factory) -> Path:
    """One tokenized-data cache for the module's runs (the same data is prepared once)."""
    return tmp_path_factory.mktemp("prep-cache")


def small_recipe(tmp_path: Path, model_dir: Path, cache: Path, **sections) -> dict:
    data = {"cache_dir": str(cache), **sections.pop("data", {})}
    return recipe_dict(tmp_path, model_dir, data=data, **sections)


def run_main(capsys, *args) -> tuple[int, str]:
    """`multitune ARGS` in this process: (exit code, stdout + stderr)."""
    from multitune.launch.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def logged_steps(run: Path) -> list[int]:
    return [e["step"] for e in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "eval" not in e]


# --- kill -9 while writing a checkpoint ------------------------------------------------------------------------

# Saves steps 1 and 2 of a small model whose weights equal the step number, then step 3 with MULTITUNE_KILL_AT set.
WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from multitune.trainer.checkpoint import TrainState, save_checkpoint

    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    folder = Path(sys.argv[1])
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
        model(torch.ones(1, 64)).sum().backward()
        optimizer.step()  # optimizer state to save as well
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
        save_checkpoint(folder, model, optimizer, scheduler, TrainState(step=step), keep_last=2)
""")


KILL_POINTS = {  # where the writer is killed -> (newest complete checkpoint after it, what it leaves behind)
    "checkpoint-weights@3": ("step-2", ".step-3.tmp"),  # weights of step 3 written, optimizer not yet
    "checkpoint-written@3": ("step-2", ".step-3.tmp"),  # every file written and fsynced, not yet renamed
    "checkpoint-renamed@3": ("step-3", None),  # renamed into place, older ones not yet pruned
    "checkpoint-retired@1": ("step-3", ".step-1.del"),  # killed half-way through deleting the oldest
}


@pytest.fixture(scope="module")
def killed_writers(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """One writer process per kill point, run side by side (each pays torch's import once)."""
    root = tmp_path_factory.mktemp("killed")
    started = {point: subprocess.Popen([sys.executable, "-c", WRITER, str(root / str(i))], cwd=REPO, text=True,
                                       stderr=subprocess.PIPE, env={**ENV, "MULTITUNE_KILL_AT": point})
               for i, point in enumerate(KILL_POINTS)}
    results = {}
    for i, (point, proc) in enumerate(started.items()):
        _, stderr = proc.communicate(timeout=300)
        results[point] = (root / str(i), (proc.returncode, stderr))
    return results


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_while_saving_leaves_only_complete_checkpoints(killed_writers, point):
    from multitune.trainer.checkpoint import TrainState, list_checkpoints, load_checkpoint, save_checkpoint

    newest, leftover = KILL_POINTS[point]
    folder, (returncode, stderr) = killed_writers[point]
    assert returncode == -signal.SIGKILL, stderr
    found = list_checkpoints(folder)
    assert found[-1].name == newest
    assert all((p / "state.json").is_file() for p in found)
    if leftover:
        assert (folder / leftover).is_dir()

    # resume resolves the newest complete one and restores exactly what was saved at that step
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = load_checkpoint(found[-1], model, optimizer, scheduler)
    expected = float(newest.split("-")[1])
    assert state.step == expected and bool((model.weight == expected).all())
    assert optimizer.state_dict()["state"][0]["step"] == expected

    # the next save clears what the killed one left behind
    save_checkpoint(folder, model, optimizer, scheduler, TrainState(step=4), keep_last=2)
    assert sorted(p.name for p in folder.iterdir()) == [newest, "step-4"]


@pytest.mark.slow
def test_run_killed_mid_checkpoint_resumes_from_the_previous_one(tmp_path, tiny_model_dir, prep_cache, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe(tmp_path, tiny_model_dir, prep_cache,
                                                            train={"max_steps": 6},
                                                            checkpoint={"every_steps": 2, "keep_last": 3}))
    killed = subprocess.run([sys.executable, "-m", "multitune", "train", str(recipe)], cwd=REPO, capture_output=True,
                            text=True, env={**ENV, "MULTITUNE_KILL_AT": "checkpoint-written@4"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [".step-4.tmp", "step-2"]
    assert logged_steps(run) == [1, 2, 3, 4]

    code, stderr = run_main(capsys, "train", recipe, "--resume")
    assert code == 0, stderr
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6]  # steps 3-4 redone from step-2, each logged once
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


# --- disk full --------------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a chosen size (root only; the test is skipped where mounting is not allowed)."""
    mounted = []

    def make(size_kib: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.slow
def test_disk_full_during_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir, prep_cache,
                                                                             small_disk, capsys):
    from multitune.trainer.checkpoint import list_checkpoints, read_state

    def recipe(out: Path) -> Path:
        return write_recipe(tmp_path / "r.yaml", small_recipe(tmp_path, tiny_model_dir, prep_cache,
                                                              output_dir=str(out / "run"), train={"max_steps": 4},
                                                              checkpoint={"every_steps": 2, "keep_last": 5}))

    # measure one checkpoint, then give a disk with room for the run plus about one and a half of them
    code, stderr = run_main(capsys, "train", recipe(tmp_path / "measure"), "train.max_steps=2")
    assert code == 0, stderr
    checkpoint_kib = sum(p.stat().st_size for p in (tmp_path / "measure/run/checkpoints/step-2").rglob("*")) // 1024
    disk = small_disk(int(checkpoint_kib * 1.5) + 64)

    code, stderr = run_main(capsys, "train", recipe(disk))
    line = error_line(stderr)
    assert code == 1 and "checkpoint step-4 not saved: no space left" in line and "kept step-2" in line, stderr
    checkpoints = disk / "run" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-2"]  # the half-written one was removed
    assert read_state(list_checkpoints(checkpoints)[-1]).step == 2
    assert logged_steps(disk / "run") == [1, 2, 3, 4]


def test_disk_full_during_prep_is_one_line_and_leaves_no_partial_cache(tmp_path, tiny_model_dir, small_disk, capsys):
    disk = small_disk(128)  # the recipe's 200 tickets take ~0.5 MB of shards
    path = write_recipe(tmp_path / "r.yaml", small_recipe(tmp_path, tiny_model_dir, disk / "cache"))
    code, stderr = run_main(capsys, "prep", path)
    line = error_line(stderr)
    assert code == 1 and "error: no space left on the device" in line, stderr
    assert list((disk / "cache").iterdir()) == []  # the temporary build folder is gone: no half cache to hit later


# --- NaN / inf --------------------------------------------------------------------------------------------------

# An enormous learning rate: step 1 is finite, Adam's first update (~lr per weight) overflows the next forward.
EXPLODING = {"lr": 1e30, "scheduler": "constant", "warmup_steps": 0, "max_steps": 5, "grad_accum": 1}


@pytest.mark.parametrize("policy, message", [
    ({"nonfinite": "stop"}, "non-finite loss (nan) at step 2: run stopped (train.nonfinite=stop)"),
    ({"nonfinite": "skip", "max_nonfinite_skips": 2}, "at step 2: 3 steps in a row non-finite, more than "
                                                      "train.max_nonfinite_skips=2"),
])
def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir,
                                                                                 prep_cache, capsys, policy, message):
    from safetensors.torch import load_file

    recipe = write_recipe(tmp_path / "r.yaml", small_recipe(tmp_path, tiny_model_dir, prep_cache,
                                                            train={**EXPLODING, **policy},
                                                            checkpoint={"every_steps": 1, "keep_last": 5}))
    code, stderr = run_main(capsys, "train", recipe)
    line = error_line(stderr)
    assert code == 1 and message in line and "last good checkpoint" in line and "step-1 kept" in line, stderr
    assert stderr.count("skipped (") == policy.get("max_nonfinite_skips", 0)
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-1"]
    weights = load_file(run / "checkpoints" / "step-1" / "trainable.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert logged_steps(run) == [1]


# --- resume after an incompatible change ------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_is_refused_after_an_incompatible_change_unless_forced(tmp_path, tiny_model_dir, prep_cache, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe(tmp_path, tiny_model_dir, prep_cache,
                                                            train={"max_steps": 2}, checkpoint={"every_steps": 2}))
    code, stderr = run_main(capsys, "train", recipe)
    assert code == 0, stderr
    run = tmp_path / "run"
    before = tree_digest(run)

    for override, reason in [
        ("adapter.r=16", "adapter.r changed (8 -> 16)"),
        ("data.generator.seed=2", "data changed (manifest hash"),
        ("train.micro_batch_tokens=2048", "train.micro_batch_tokens changed (1024 -> 2048)"),
    ]:
        code, stderr = run_main(capsys, "train", recipe, "--resume", override, "train.max_steps=4")
        line = error_line(stderr)
        assert code == 2 and "step-2: cannot resume" in line and reason in line and "--force-resume" in line, stderr
        assert tree_digest(run) == before  # refused before anything in output_dir was touched

    # a tampered checkpoint (arbitrary pickle instead of tensors) is refused, not unpickled
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    optimizer_file = run / "checkpoints" / "step-2" / "optimizer.pt"
    original = optimizer_file.read_bytes()
    torch.save({"state": Payload()}, optimizer_file)
    code, stderr = run_main(capsys, "train", recipe, "--resume", "train.max_steps=4")
    assert code == 2 and "refused to load" in error_line(stderr) and not (tmp_path / "pwned").exists()
    optimizer_file.write_bytes(original)

    # what does not change the checkpoint's meaning (max_steps, lr) resumes; --force-resume overrides a mismatch
    code, stderr = run_main(capsys, "train", recipe, "--force-resume", "data.generator.seed=2", "train.max_steps=4",
                            "train.lr=5e-4")
    assert code == 0, stderr
    assert "--force-resume from" in stderr and "data changed" in stderr
    assert logged_steps(run) == [1, 2, 3, 4]
    state = json.loads((run / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["recipe"]["adapter.r"] == 8 and state["data_hash"] != json.loads(
        (run / "checkpoints" / "step-2" / "state.json").read_text())["data_hash"]


def test_resume_refuses_a_change_of_trainable_shapes_even_when_forced(tmp_path, capsys):
    """Shapes are compared, not a list of keys: `process.embed_dim` (input-layer width with combine=concat) changes
    the trainable shapes, so resuming is one line naming the parameter and the recipe key, exit 2, with or without
    --force-resume, and output_dir is untouched; a change that keeps every shape (the loss weights) resumes."""
    recipe = write_recipe(tmp_path / "r.yaml", {
        "task": "process_monitoring", "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": "lstm", "dtype": "float32"}, "adapter": {"kind": "none"},
        "process": {"backbone": "lstm", "rnn_hidden_size": 16, "combine": "concat", "embed_dim": 8,
                    "columns": {"categorical": ["org:resource"], "continuous": []}},
        "data": {"generator": {"n_train": 40, "n_eval": 10, "seed": 0}, "max_seq_len": 32,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 2, "micro_batch_tokens": 64}, "eval": {"before_training": False},
        "checkpoint": {"every_steps": 2},
    })
    code, stderr = run_main(capsys, "train", recipe)
    assert code == 0, stderr
    run = tmp_path / "run"
    state = json.loads((run / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["shapes"]["inputs.embeddings.0.weight"][1] == 8 and state["recipe"]["process.embed_dim"] == 8
    before = tree_digest(run)
    for flag in ("--resume", "--force-resume"):
        code, stderr = run_main(capsys, "train", recipe, flag, "process.embed_dim=12", "train.max_steps=4")
        line = error_line(stderr)
        assert code == 2 and "step-2: cannot resume" in line, stderr
        assert "process.embed_dim changed (8 -> 12)" in line and "not even with --force-resume" in line
        assert "inputs.continuous.bias has shape (8,) in the checkpoint but (12,) in the model" in line
        assert tree_digest(run) == before
    code, stderr = run_main(capsys, "train", recipe, "--resume", "process.loss_weights.remaining_time=0.5",
                            "train.max_steps=4")
    assert code == 0, stderr
    assert logged_steps(run) == [1, 2, 3, 4]


def test_shape_check_reads_checkpoints_that_predate_recorded_shapes(tmp_path):
    """A checkpoint whose state.json has no shapes: they come from its trainable.safetensors header."""
    from safetensors.torch import save_file

    from multitune.trainer.checkpoint import checkpoint_shapes, shape_problems

    folder = tmp_path / "step-2"
    folder.mkdir()
    save_file({"a.lora_A.weight": torch.zeros(8, 64), "head.weight": torch.zeros(3, 64)},
              str(folder / "trainable.safetensors"))
    (folder / "state.json").write_text(json.dumps({"step": 2, "recipe": {"adapter.r": 8}}))
    saved = checkpoint_shapes(folder)
    assert saved == {"a.lora_A.weight": [8, 64], "head.weight": [3, 64]}
    assert shape_problems(saved, {"a.lora_A.weight": [8, 64], "head.weight": [3, 64]}) == []
    assert shape_problems(saved, {"a.lora_A.weight": [16, 64], "head.weight": [3, 64], "b.weight": [2]}) == [
        "a.lora_A.weight has shape (8, 64) in the checkpoint but (16, 64) in the model",
        "b.weight (2,) is trainable in the model but not in the checkpoint"]
    assert shape_problems(saved, {"a.lora_A.weight": [8, 64]}) == [
        "head.weight is in the checkpoint but not a trainable parameter of the model"]


# --- a rank dies ------------------------------------------------------------------------------------------------

def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the launched worker with RANK=rank among the launcher's descendants."""
    children = {launcher}
    for _ in range(4):
        for status in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = status.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) in children:
                children.add(int(status.parent.name))
    for pid in children - {launcher}:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return pid
    return None


@pytest.mark.slow
def test_one_rank_killed_ends_the_job_with_an_error_within_60_s(tmp_path, tiny_model_dir, prep_cache):
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe(
        tmp_path, tiny_model_dir, prep_cache, train={"max_steps": 500}, checkpoint={"every_steps": 2, "keep_last": 2},
        distributed={"strategy": "ddp", "timeout_s": 30}))
    launcher = subprocess.Popen([sys.executable, "-m", "multitune", "train", str(recipe), "--num_processes", "2"],
                                cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        time.sleep(0.2)
    victim = rank_pid(launcher.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        _, stderr = launcher.communicate(timeout=90)
    finally:
        launcher.kill()
    took = time.monotonic() - killed_at
    assert launcher.returncode not in (0, None) and took < 60, (launcher.returncode, took, stderr[-3000:])
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "a training rank failed" in errors[-1] and "checkpoint" in errors[-1], stderr[-3000:]
    assert "rank      : 1 (local_rank: 1)" in stderr and "Signal 9 (SIGKILL)" in stderr  # the launcher's report
    print(f"rank 1 killed: launcher exited {launcher.returncode} after {took:.1f} s")
    from multitune.trainer.checkpoint import list_checkpoints

    assert all((p / "rng-1.pt").is_file() for p in list_checkpoints(tmp_path / "run" / "checkpoints"))
