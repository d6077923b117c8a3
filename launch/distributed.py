"""`multitune train` for multi-process strategies: build the `accelerate launch ... -m multitune train
RECIPE` command."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from multitune.recipes.accelerate_config import resolve_accelerate_config

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class LaunchFlags:
    num_processes: int | None = None  # total over all machines
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None


def resolve_config(recipe) -> Path:
    """The accelerate config file this recipe launches with (checked against the recipe at validate time)."""
    return resolve_accelerate_config(recipe)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(recipe, recipe_path: str, trainer_args: list[str], flags: LaunchFlags) -> tuple[list[str], dict]:
    """The command and environment that start this machine's ranks of the job."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(resolve_config(recipe))]
    if flags.num_processes:
        cmd += ["--num_processes", str(flags.num_processes)]
    cmd += ["--num_machines", str(flags.num_machines), "--machine_rank", str(flags.machine_rank)]
    if flags.main_process_ip:
        cmd += ["--main_process_ip", flags.main_process_ip]
    # One machine: a free port, so concurrent jobs on a host never collide. Several: all must name the same one.
    port = flags.main_process_port or (free_port() if flags.num_machines == 1 else 29500)
    cmd += ["--main_process_port", str(port), "-m", "multitune", "train", recipe_path, *trainer_args]
    env = dict(os.environ)
    # DeepSpeed JIT-compiles a communication op on first use (~1 min); keep the build between runs.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "cache" / "torch_extensions"))
    return cmd, env
