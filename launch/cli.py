"""The `multitune` command: parse arguments, load the recipe once, hand typed objects to data_prep/trainer."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from recipes.errors import InputError


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multitune", description="Fine-tune LLMs from validated YAML recipes.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a recipe (schema, combinations, task) without running anything")
    _recipe_args(p)
    p = sub.add_parser("prep", help="tokenize the recipe's data into Arrow shards (cached by content hash)")
    _recipe_args(p)
    p = sub.add_parser("train", help="train a recipe end to end")
    _recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    launch = p.add_argument_group("multi-process strategies (ddp, fsdp, zero2, zero3): passed to accelerate launch")
    launch.add_argument("--num_processes", type=int, help="total ranks over all machines (default: the config's)")
    launch.add_argument("--num_machines", type=int, default=1)
    launch.add_argument("--machine_rank", type=int, default=0)
    launch.add_argument("--main_process_ip", help="address of machine rank 0")
    launch.add_argument("--main_process_port", type=int, help="port on machine rank 0 (default: a free one)")
    p = sub.add_parser("eval", help="generation eval of the base model or base + adapter on the recipe's eval split")
    _recipe_args(p)
    p.add_argument("--adapter", help="adapter folder (omit to evaluate the base model)")
    p = sub.add_parser("merge", help="merge an adapter into its base model and save a standalone model")
    p.add_argument("--adapter", required=True, help="adapter folder written by a run")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--base", help="base model to merge onto (default: the one the adapter was trained on)")
    p.add_argument("--onto", choices=["dequantized", "original"], default="dequantized",
                   help="for QLoRA adapters: merge onto the dequantized NF4 base (what was trained) or the original")
    p = sub.add_parser("tiny-model", help="build a random-init tiny causal LM with a real tokenizer")
    p.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    p.add_argument("--out", required=True)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    return parser


def quiet_library_noise() -> None:
    """Silence start-up chatter that is not about the user's run (stderr should carry their errors)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes tries to fetch an optional CPU kernel from the hub on import and warns when it cannot.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns on every import that it guessed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_noise()
    try:
        return COMMANDS[args.command](args) or 0
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _load(args):
    from data_prep.tasks import get_task
    from recipes.loader import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    get_task(recipe.task)
    return recipe


def cmd_validate(args) -> int:
    recipe = _load(args)
    print(f"ok: {args.recipe} (task={recipe.task}, model={recipe.model.name_or_path}, "
          f"method={_method(recipe)}, strategy={recipe.distributed.strategy})")
    return 0


def cmd_prep(args) -> int:
    from data_prep.prepare import prepare
    from data_prep.tasks import get_task
    from trainer.model import load_tokenizer

    recipe = _load(args)
    prepared = prepare(get_task(recipe.task), recipe.data, load_tokenizer(recipe.model))
    splits = prepared.manifest["splits"]
    print(f"{'cache hit' if prepared.cache_hit else 'prepared'}: {prepared.folder}")
    for name, stats in splits.items():
        print(f"  {name}: {stats['rows']} rows, {stats['tokens']} tokens ({stats['target_tokens']} targets), "
              f"dropped {stats['dropped']}, truncated {stats['truncated']}")
    return 0


def cmd_train(args) -> int:
    recipe = _load(args)
    if recipe.distributed.strategy != "single" and "LOCAL_RANK" not in os.environ:
        return _launch(recipe, args)  # not yet inside a launched rank: start this machine's ranks
    import torch.distributed

    from trainer.loop import train

    try:
        train(recipe, resume=args.resume, overwrite=args.overwrite)
    finally:
        if torch.distributed.is_initialized():  # a launched rank: leave the group cleanly
            torch.distributed.destroy_process_group()
    return 0


def _launch(recipe, args) -> int:
    import subprocess

    from launch.distributed import LaunchFlags, launch_command

    flags = LaunchFlags(args.num_processes, args.num_machines, args.machine_rank, args.main_process_ip,
                        args.main_process_port)
    trainer_args = [*args.overrides, *(["--resume"] if args.resume else []), *(["--overwrite"] if args.overwrite else [])]
    cmd, env = launch_command(recipe, args.recipe, trainer_args, flags)
    print("[multitune] " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    return subprocess.run(cmd, env=env).returncode


def cmd_eval(args) -> int:
    from trainer.evaluate import evaluate_recipe

    metrics = evaluate_recipe(_load(args), Path(args.adapter) if args.adapter else None)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_merge(args) -> int:
    from trainer.merge import merge_adapter

    out = merge_adapter(Path(args.adapter), Path(args.out), base=args.base, onto=args.onto)
    print(f"merged model written to {out}")
    return 0


def cmd_tiny_model(args) -> int:
    from recipes.schema import TinyModelSpec
    from trainer.tiny_model import build_tiny_model

    out = Path(args.out)
    if out.exists():
        raise InputError(f"--out {out} already exists")
    build_tiny_model(TinyModelSpec(arch=args.arch, hidden_size=args.hidden_size, num_layers=args.layers), out)
    print(f"tiny {args.arch} model written to {out}")
    return 0


def _method(recipe) -> str:
    if recipe.adapter.kind == "none":
        return "full"
    return "qlora" if recipe.model.quantization == "nf4" else "lora"


COMMANDS = {
    "validate": cmd_validate, "prep": cmd_prep, "train": cmd_train, "eval": cmd_eval, "merge": cmd_merge,
    "tiny-model": cmd_tiny_model,
}

if __name__ == "__main__":
    sys.exit(main())
