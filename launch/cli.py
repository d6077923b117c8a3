"""The `multitune` command: parse arguments, load the recipe once, hand typed objects to data_prep/trainer."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from multitune.compat import jemalloc_env, quiet_library_noise
from multitune.launch import results, slurm, sweep
from multitune.launch.run import exit_code, run_training
from multitune.recipes.errors import InputError, RunStopped

OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")
# Commands that read models, adapters and files a user points at: an OSError, ValueError or template error from
# there is about that input (a folder without config.json, a malformed adapter_config.json, a port in use), so it
# is one `error:` line with exit code 2 rather than a traceback from deep inside a library.
USER_INPUT_COMMANDS = ("merge", "infer", "serve", "eval", "results")
SERVE_KEY_ENV = "MULTITUNE_API_KEY"  # the key `multitune serve` requires when --api-key(-env) is not given


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line and exit code 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="multitune", description="Fine-tune LLMs from validated YAML recipes.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a recipe (schema, combinations, task, one example through the "
                                           "chat template) without training")
    _recipe_args(p)
    p = sub.add_parser("prep", help="tokenize the recipe's data into Arrow shards (cached by content hash)")
    _recipe_args(p)
    p = sub.add_parser("train", help="train a recipe end to end")
    _recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--force-resume", action="store_true",
                   help="resume even though the data or resume-relevant recipe keys changed since the checkpoint "
                        "(never across a change of trainable shapes)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    launch = p.add_argument_group("multi-process strategies (ddp, fsdp, zero2, zero3): passed to accelerate launch")
    launch.add_argument("--num_processes", type=int, help="total ranks over all machines (default: the config's)")
    launch.add_argument("--num_machines", type=int, default=1)
    launch.add_argument("--machine_rank", type=int, default=0)
    launch.add_argument("--main_process_ip", help="address of machine rank 0")
    launch.add_argument("--main_process_port", type=int, help="port on machine rank 0 (default: a free one)")
    p = sub.add_parser("eval", help="generation eval of the base model and adapters on the recipe's eval split, "
                                    "one comparison table")
    _recipe_args(p)
    p.add_argument("--adapter", action="append", default=[], help="adapter folder (repeat to compare several)")
    p.add_argument("--no-base", action="store_true", help="skip the base model (only with --adapter or --endpoint)")
    p.add_argument("--endpoint", metavar="URL", help="OpenAI-compatible base URL to compare, e.g. http://host:8000/v1")
    p.add_argument("--endpoint-model", metavar="NAME", help="model name to request from --endpoint")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key "
                                                        "(default: OPENAI_API_KEY when set, else no key)")
    p.add_argument("--judge-endpoint", metavar="URL", help="OpenAI-compatible base URL of an LLM judge (1-5 score)")
    p.add_argument("--judge-model", metavar="NAME", help="model name to request from --judge-endpoint")
    p.add_argument("--judge-api-key-env", metavar="VAR", help="API key variable for the judge (default: as above)")
    p.add_argument("--endpoint-timeout", type=float, default=60.0, metavar="S", help="seconds per request")
    p.add_argument("--endpoint-retries", type=int, default=2, metavar="N", help="retries per request")
    p.add_argument("--retrieval-docs", metavar="DIR", help="medical QA: also evaluate every column with the top-k "
                                                           "passages of these .txt/.md files in the prompt (+rag)")
    p.add_argument("--retrieval-k", type=int, default=3, metavar="K", help="passages per question (default 3)")
    p = sub.add_parser("infer", help="answer new rows (JSONL/CSV) with base + adapter; parsed fields per row")
    _recipe_args(p)
    p.add_argument("--adapter", help="adapter folder (omit to run the base model)")
    p.add_argument("--input", required=True, help="JSONL or CSV of rows with the task's input fields")
    p.add_argument("--output", required=True, help="JSONL to write, one row per input row")
    p.add_argument("--batch-size", type=int, help="generation batch size (default eval.batch_size)")
    p = sub.add_parser("grid", help="train a small hyperparameter grid; one metrics CSV, the loss logs and a plot")
    _recipe_args(p)
    p.add_argument("--param", action="append", default=[], metavar="key.sub=v1,v2",
                   help="a recipe key and the values to try (repeat for a grid)")
    p = sub.add_parser("serve", help="serve a model (+ adapter) behind an OpenAI-compatible chat-completions API")
    p.add_argument("model", nargs="?", help="base model: hub id or local folder (default: the one --adapter was "
                                           "trained on)")
    p.add_argument("--adapter", help="adapter folder to apply")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--quantization", choices=["none", "nf4"], default=None,
                   help="load the base in 4-bit NF4 (default: as the adapter's multitune.json records, i.e. NF4 "
                        "for a QLoRA adapter; none without an adapter)")
    p.add_argument("--served-name", help="model name clients use (default: the run or model folder name)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key clients must "
                                                          "send as 'Authorization: Bearer KEY' (default: "
                                                          f"{SERVE_KEY_ENV} when set, else no key)")
    key.add_argument("--api-key", metavar="KEY", help="the API key itself (visible in the process list: prefer "
                                                      "--api-key-env)")
    p.add_argument("--max-tokens", type=int, default=4096, metavar="N",
                   help="most new tokens a request may ask for (default 4096; a request without max_tokens gets "
                        "256, or N when smaller)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, metavar="B",
                   help="largest request body (default 4 MiB); larger ones get 413 unread")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds a request may take from arrival to its last token, queueing included (default 600)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests that may wait behind the one generating; more get 429 (default 64)")
    p = sub.add_parser("merge", help="merge an adapter into its base model and save a standalone model")
    p.add_argument("--adapter", required=True, help="adapter folder written by a run")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--base", help="base model to merge onto (default: the one the adapter was trained on)")
    p.add_argument("--onto", choices=["dequantized", "original"], default="dequantized",
                   help="for QLoRA adapters: merge onto the dequantized NF4 base (what was trained) or the original")
    p = sub.add_parser("export", help="merge an adapter into its base and write a GGUF file (llama.cpp, Ollama, "
                                      "LM Studio)")
    p.add_argument("--adapter", required=True, help="adapter folder written by a run")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="GGUF file to write")
    p.add_argument("--type", choices=["f16", "q8_0"], default="f16",
                   help="weight type of the 2-D tensors (norms and biases stay f32; default f16)")
    p.add_argument("--base", help="base model to merge onto (default: the one the adapter was trained on)")
    p = sub.add_parser("plan", help="per-GPU peak memory estimate from the model config (no weights), fits or not")
    _recipe_args(p)
    p.add_argument("--gpus", type=int, required=True, help="GPUs the run uses")
    p.add_argument("--gpu-mem", type=float, required=True, metavar="GIB", help="memory per GPU (24 for a 24 GB card)")
    p.add_argument("--target-fraction", type=float, default=1.0, metavar="F",
                   help="share of positions with a loss target (logits are computed only there; default 1)")
    p.add_argument("--gpus-per-node", type=int, metavar="N", help="GPUs per machine (default: all on one, up to 8)")
    p.add_argument("--cpu-mem", type=float, metavar="GIB", help="CPU RAM per machine: also check the host side fits")
    p = sub.add_parser("tiny-model", help="build a random-init tiny causal LM with a real tokenizer")
    p.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    p.add_argument("--out", required=True)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    slurm.add_parser(sub)
    sweep.add_parser(sub)
    results.add_parser(sub)
    return parser


def entry() -> int:
    """The `multitune` command and `python -m multitune`: `main`, re-run first under jemalloc where that helps
    (`compat.jemalloc_env`: CPU-only machines with jemalloc installed). Tests call `main` in-process instead."""
    env = jemalloc_env(os.environ)
    if env is not None:
        os.execve(sys.executable, [sys.executable, "-m", "multitune", *sys.argv[1:]], env)
    return main()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse cannot take positionals after flags (`train R.yaml --resume key=value`); collect such overrides here.
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or not all(OVERRIDE.match(item) for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    quiet_library_noise()
    try:
        return COMMANDS[args.command](args) or 0
    except Exception as exc:  # noqa: BLE001 - ours re-raised below with their traceback
        code = exit_code(exc, args.command, args.command in USER_INPUT_COMMANDS)
        if code is None:
            raise
        return code


def _load(args):
    from multitune.data_prep.tasks import task_for
    from multitune.recipes.loader import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    task_for(recipe)  # the task exists and takes the recipe's task options
    return recipe


def _load_chat(args):
    """The recipe of a command that generates text (eval, infer): a chat task's; others evaluate in `train`."""
    from multitune.data_prep.tasks import ChatTask, task_for

    recipe = _load(args)
    if not isinstance(task_for(recipe), ChatTask):
        raise InputError(f"multitune {args.command}: task {recipe.task} is not a chat task (it predicts from event "
                         "sequences); `multitune train` evaluates it (metrics.json, per_prefix.png)")
    return recipe


def cmd_validate(args) -> int:
    recipe = _load(args)
    if recipe.distributed.strategy != "single":
        from multitune.launch.distributed import resolve_config

        resolve_config(recipe)
    if recipe.train.compile:
        import torch

        from multitune.trainer.model import check_compiler

        check_compiler(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rendered = _render_one_example(recipe)  # fails before any "ok"
    print(f"ok: {args.recipe} (task={recipe.task}, model={recipe.model.name_or_path}, "
          f"method={_method(recipe)}, strategy={recipe.distributed.strategy})")
    if rendered:
        print(f"chat template: {rendered}")
    return 0


def _render_one_example(recipe) -> str | None:
    """One example of the recipe's data encoded through the model's chat template, as prep will: a template that
    fails does so here, in one line, rather than in `train`. None for a task that is not chat."""
    from multitune.data_prep.chat_encoding import chat_encoder
    from multitune.data_prep.tasks import ChatTask, task_for
    from multitune.trainer.model import tokenizer_for_check

    task = task_for(recipe)
    if not isinstance(task, ChatTask):
        return None
    tokenizer = tokenizer_for_check(recipe.model)
    if tokenizer is None:
        return f"not checked ({recipe.model.name_or_path} is not available here)"
    data = recipe.data
    record = task.generate(1, data.generator.seed)[0] if data.generator else next(iter(task.read(
        data.train_file, columns=data.columns, delimiter=data.csv_delimiter)))
    example = task.format(record)
    encoder = chat_encoder(tokenizer)
    row = encoder.encode_examples([example.messages], [example.answer])[0]
    folded = any(m["role"] == "system" for m in example.messages) and encoder.fold_system
    answer, limit = len(row.completion_ids), recipe.eval.max_new_tokens
    return (f"one example renders to {len(row.prompt_ids)} prompt + {answer} answer tokens"
            + (" (the template has no system role: the system prompt goes into the first user turn)" if folded
               else "")
            + (f"; warning: eval.max_new_tokens={limit} is shorter than this answer, so generation would stop "
               "before it ends (train and eval count every eval row)" if answer > limit else ""))


def cmd_prep(args) -> int:
    from multitune.data_prep.tasks import task_for
    from multitune.trainer.workload import workload_for

    recipe = _load(args)
    prepared = workload_for(recipe, task_for(recipe)).prepare()  # the same shards (and cache key) train uses
    splits = prepared.manifest["splits"]
    print(f"{'cache hit' if prepared.cache_hit else 'prepared'}: {prepared.folder}")
    for name, stats in splits.items():
        print(f"  {name}: {stats['rows']} rows, {stats['tokens']} tokens ({stats['target_tokens']} targets), "
              f"dropped {stats['dropped']}, truncated {stats['truncated']} "
              f"({stats.get('truncated_tokens', 0)} prompt tokens cut)")
    if prepared.labels:
        import json

        print(f"  labels: {json.dumps(prepared.labels, ensure_ascii=False)}")
    return 0


def cmd_train(args) -> int:
    recipe = _load(args)
    if recipe.distributed.strategy != "single" and "LOCAL_RANK" not in os.environ:
        return _launch(recipe, args)  # not yet inside a launched rank: start this machine's ranks
    return run_training(recipe, resume=args.resume or args.force_resume, overwrite=args.overwrite,
                        force_resume=args.force_resume)


def _launch(recipe, args) -> int:
    import subprocess

    from multitune.launch.distributed import LaunchFlags, launch_command

    flags = LaunchFlags(args.num_processes, args.num_machines, args.machine_rank, args.main_process_ip,
                        args.main_process_port)
    trainer_args = [*args.overrides, *(["--resume"] if args.resume else []),
                    *(["--overwrite"] if args.overwrite else []), *(["--force-resume"] if args.force_resume else [])]
    cmd, env = launch_command(recipe, args.recipe, trainer_args, flags)
    print("[multitune] " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    code = subprocess.run(cmd, env=env).returncode
    if code != 0:  # a rank failed or died; the launcher has ended the others and printed which one
        from multitune.trainer.checkpoint import list_checkpoints

        kept = list_checkpoints(recipe.output_path / "checkpoints")
        raise RunStopped(f"a training rank failed (accelerate launch exited with {code}, its report above names "
                         f"the rank); " + (f"newest complete checkpoint {kept[-1]}, continue with --resume" if kept
                                           else "no checkpoint written yet"))
    return 0


def cmd_slurm(args) -> int:
    from multitune.launch.scheduler import wait
    from multitune.trainer.run_files import check_output_dir

    recipe = _load(args)
    options = slurm.options_from_args(args)
    slurm.check_options(options, recipe)
    if warning := slurm.signal_warning(options):
        print(warning, file=sys.stderr)
    folder = slurm.job_folder(recipe)
    if args.dry_run:
        print(slurm.render_sbatch(folder, options), end="")
        return 0
    check_output_dir(recipe.output_path, resume=args.resume, overwrite=args.overwrite)  # refused before submitting
    job = slurm.submit(recipe, args.recipe, args.overrides, options, args.overwrite, args.resume)
    print(f"submitted job {job.job_id}: {options.nodes} node(s) x {options.ntasks_per_node} task(s), "
          f"time limit {options.time}, up to {options.max_requeues} requeues")
    print(f"follow it:  tail -F {slurm.log_paths(folder, job.job_id, options)}"
          f"   (squeue -j {job.job_id}, sacct -j {job.job_id}, scancel {job.job_id})", flush=True)
    if not args.wait:
        return 0
    from submitit.core.utils import UncompletedJobError

    try:
        wait(job)  # through requeues; a pending reason that can never clear cancels the job and raises
        job.results()  # every task's; raises when the job failed or was cancelled
    except UncompletedJobError as exc:  # carries the job's own error output
        print(f"job {job.job_id} did not complete ({job.state}): {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the job was submitted to outlive this terminal: it keeps running
        print(f"\nstopped waiting; job {job.job_id} keeps running (scancel {job.job_id} to stop it)", file=sys.stderr)
        return 130
    print(f"job {job.job_id} completed: {recipe.output_path}")
    return 0


def cmd_eval(args) -> int:
    from multitune.trainer.evaluate import evaluate_recipe
    from multitune.trainer.judge import Judge
    from multitune.trainer.retrieval import Retriever, load_passages

    endpoint = _endpoint_client(args, (args.endpoint, "--endpoint"), (args.endpoint_model, "--endpoint-model"),
                                args.api_key_env)
    judge_client = _endpoint_client(args, (args.judge_endpoint, "--judge-endpoint"),
                                    (args.judge_model, "--judge-model"), args.judge_api_key_env or args.api_key_env)
    if args.no_base and not args.adapter and endpoint is None:
        raise InputError("--no-base leaves nothing to evaluate: give at least one --adapter or an --endpoint")
    if args.retrieval_k < 1:
        raise InputError("--retrieval-k must be at least 1")
    passages = load_passages(Path(args.retrieval_docs)) if args.retrieval_docs else None
    recipe = _load_chat(args)
    _, table = evaluate_recipe(recipe, [Path(a) for a in args.adapter], include_base=not args.no_base,
                               endpoint=endpoint, judge=Judge(judge_client) if judge_client else None,
                               retriever=Retriever(passages) if passages else None, top_k=args.retrieval_k)
    print(table)
    print(f"written to {recipe.output_path / 'eval'}/comparison.csv and .md")
    return 0


def _endpoint_client(args, url: tuple[str | None, str], model: tuple[str | None, str], key_env: str | None):
    """An endpoint client from a (value, flag) URL + model pair, or None when neither is given."""
    if url[0] is None and model[0] is None:
        return None
    if url[0] is None or model[0] is None:
        raise InputError(f"{url[1]} and {model[1]} go together: give both")
    if args.endpoint_retries < 0 or args.endpoint_timeout <= 0:
        raise InputError("--endpoint-retries must be >= 0 and --endpoint-timeout > 0")
    from multitune.trainer.endpoint import EndpointClient, EndpointSpec

    return EndpointClient(EndpointSpec(url[0], model[0], key_env, timeout_s=args.endpoint_timeout,
                                       max_retries=args.endpoint_retries))


def cmd_infer(args) -> int:
    from multitune.launch.infer import run_inference

    counts = run_inference(_load_chat(args), Path(args.adapter) if args.adapter else None, Path(args.input),
                           Path(args.output), args.batch_size)
    print(f"{counts['rows']} rows written to {args.output} ({counts['valid']} valid, {counts['invalid']} flagged)")
    return 0


def cmd_grid(args) -> int:
    from multitune.launch.grid import parse_params, run_grid

    params = parse_params(args.param)
    _load(args)
    grid_dir = run_grid(args.recipe, args.overrides, params)
    print(f"grid written to {grid_dir}: results.csv, losses.csv, loss.png")
    return 0


def serve_api_key(args) -> str | None:
    """The key `serve` requires: --api-key, else the variable --api-key-env names (which must be set), else
    MULTITUNE_API_KEY when set; None serves without a key."""
    if args.api_key is not None:
        if not args.api_key.strip():
            raise InputError("--api-key: the key is empty")
        return args.api_key
    key = os.environ.get(args.api_key_env or SERVE_KEY_ENV, "")
    if args.api_key_env and not key.strip():
        raise InputError(f"--api-key-env {args.api_key_env}: the variable is not set (export {args.api_key_env}=KEY)")
    return key or None


def cmd_serve(args) -> int:
    import torch

    from multitune.launch.chat_model import load_chat_model
    from multitune.launch.serve import ServeLimits, open_host_warning, serve

    for flag, value, least in (("--max-tokens", args.max_tokens, 1), ("--max-body-bytes", args.max_body_bytes, 1),
                               ("--max-queue", args.max_queue, 0)):
        if value < least:
            raise InputError(f"{flag} {value} is out of range (at least {least})")
    if not args.timeout > 0:
        raise InputError(f"--timeout {args.timeout:g} is out of range (more than 0 seconds)")
    api_key = serve_api_key(args)  # before the model loads: a missing key fails in a second
    warning = open_host_warning(args.host, api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    limits = ServeLimits(max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes, timeout_s=args.timeout,
                         max_queue=args.max_queue)
    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    chat = load_chat_model(args.model, Path(args.adapter) if args.adapter else None, dtype, args.served_name,
                           args.quantization)
    serve(chat, args.host, args.port, limits, api_key)
    return 0


def cmd_merge(args) -> int:
    from multitune.trainer.merge import merge_adapter

    out = merge_adapter(Path(args.adapter), Path(args.out), base=args.base, onto=args.onto)
    print(f"merged model written to {out}")
    return 0


def cmd_export(args) -> int:
    from multitune.trainer.gguf_export import export_adapter

    out = export_adapter(Path(args.adapter), Path(args.gguf), args.type, base=args.base)
    print(f"GGUF ({args.type}) written to {out} ({out.stat().st_size / 2**20:.0f} MiB)")
    return 0


def cmd_plan(args) -> int:
    from multitune.launch.plan import plan_recipe

    plan, report = plan_recipe(_load(args), args.gpus, args.gpu_mem, args.target_fraction, args.gpus_per_node,
                               args.cpu_mem)
    print(report)
    return 0 if plan.fits else 1


def cmd_tiny_model(args) -> int:
    from multitune.recipes.schema import TinyModelSpec
    from multitune.trainer.tiny_model import build_tiny_model

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
    "export": cmd_export, "tiny-model": cmd_tiny_model, "infer": cmd_infer, "grid": cmd_grid, "serve": cmd_serve,
    "plan": cmd_plan, "sweep": sweep.main, "results": results.main, "slurm": cmd_slurm,
}

if __name__ == "__main__":
    sys.exit(main())
