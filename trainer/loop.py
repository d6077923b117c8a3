"""The training loop: recipe → data → model → optimizer steps → checkpoints → adapter and metrics. Read top
to bottom."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from multitune.atomic import write_atomic
from multitune.data_prep.shards import ShardedDataset
from multitune.data_prep.tasks import task_for
from multitune.recipes.accelerate_config import deepspeed_settings, fsdp_offload_params
from multitune.recipes.errors import RunStopped
from multitune.recipes.loader import dump_recipe
from multitune.recipes.schema import Recipe, TrainConfig
from multitune.trainer.adapter_base import resolvable_base
from multitune.trainer.batches import MicroBatch, Position, batch_layout, plan_efficiency, plan_micro_batches
from multitune.trainer.checkpoint import (
    TrainState,
    check_shapes,
    checkpoint_to_resume,
    list_checkpoints,
    load_checkpoint,
    resume_fingerprint,
    save_checkpoint,
    trainable_shapes,
)
from multitune.trainer.distributed import Strategy, create_strategy
from multitune.trainer.memory import peak_memory_gb
from multitune.trainer.model import check_compiler, compile_decoder_layers, count_parameters
from multitune.trainer.preemption import Preempted, StopSignals
from multitune.trainer.run_files import RunLog, check_output_dir, claim_output_dir, finish_run
from multitune.trainer.tracking import Tracker
from multitune.trainer.workload import LossFn, Workload, workload_for


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False, force_resume: bool = False) -> dict:
    task = task_for(recipe)
    work = workload_for(recipe, task)  # what differs between text and event-sequence tasks
    # Every decision that differs between single process, DDP, FSDP2 and DeepSpeed is the strategy's.
    dist = create_strategy(recipe.distributed.strategy, dtype=recipe.model.dtype, grad_accum=recipe.train.grad_accum,
                           max_grad_norm=recipe.train.max_grad_norm, deepspeed=deepspeed_settings(recipe),
                           timeout_s=recipe.distributed.timeout_s, offload_params=fsdp_offload_params(recipe))
    accelerator = dist.accelerator
    main = dist.main
    run_dir = recipe.output_path
    check_output_dir(run_dir, resume=resume, overwrite=overwrite)
    cfg = recipe.train
    if cfg.compile:
        check_compiler(accelerator.device)

    # Data: tokenized once (main process first, the others then hit the cache), read memory-mapped.
    # Bad data, a model that does not load, or a checkpoint that does not fit this recipe, data and model (its
    # trainable shapes) fails before output_dir is touched.
    with accelerator.main_process_first():
        prepared = work.prepare()
    data_hash = prepared.manifest["hash"]
    fingerprint = resume_fingerprint(recipe)
    if resume:
        resume_from, mismatches = checkpoint_to_resume(run_dir / "checkpoints", fingerprint, data_hash, force_resume)
        if mismatches and main:
            print(f"[multitune] --force-resume from {resume_from} although {'; '.join(mismatches)}", flush=True)
    train_set = ShardedDataset(prepared.split("train"))
    eval_set = ShardedDataset(prepared.split("eval"))
    layout = batch_layout(recipe.data.packing, recipe.data.group_by_length)
    plan = plan_micro_batches(train_set.lengths, recipe.data.max_seq_len, cfg.micro_batch_tokens, layout, cfg.seed)
    efficiency = plan_efficiency(train_set.lengths, plan, recipe.data.max_seq_len, layout)
    stream = work.stream(train_set, plan, cfg.seed, accelerator.process_index, accelerator.num_processes)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * stream.per_rank / cfg.grad_accum)

    # Model, optimizer, schedule. Seeded here, after data prep and any debug-model build: what ran before (a cold
    # or a warm cache) cannot shift the LoRA init, dropout or anything else the seed determines.
    set_seed(cfg.seed)
    model = dist.load_model(lambda device, weights: work.load_model(device, cfg.gradient_checkpointing, weights),
                            quantized=recipe.model.quantization == "nf4")
    if cfg.compile:
        compiled = compile_decoder_layers(model)
        if main:
            print(f"[multitune] train.compile: {compiled} decoder layers compiled with torch.compile "
                  f"(the first micro-batches pay the compile)", flush=True)
    shapes = trainable_shapes(model)
    if resume:
        check_shapes(resume_from, shapes, fingerprint)  # not even --force-resume loads values into other shapes
    if main:
        claim_output_dir(run_dir, resume=resume, overwrite=overwrite)
        write_atomic(run_dir / "recipe.resolved.yaml", dump_recipe(recipe))
    accelerator.wait_for_everyone()
    trainable, total = count_parameters(model)
    model, optimizer = dist.prepare(model, lambda m: build_optimizer(m, recipe))
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)

    log = RunLog(run_dir / "log.jsonl")
    tracker = Tracker(recipe.tracking, run_dir, recipe.model_dump(mode="json"), enabled=main)
    tracker.summary({"data_hash": data_hash, "packing_efficiency": efficiency, "trainable_params": trainable,
                     "total_params": total})
    before = None
    if resume:
        state = load_checkpoint(resume_from, model, optimizer, scheduler, dist)
        # what later checkpoints of this run stand for
        state.data_hash, state.recipe, state.shapes = data_hash, fingerprint, shapes
        if main:
            log.truncate_after(state.step)
        before = next((e for e in log.entries() if e.get("eval") == "before"), None)
    else:
        state = TrainState(data_hash=data_hash, recipe=fingerprint, shapes=shapes)
        if recipe.eval.before_training:
            with eager():
                before, _ = dist.model_call(lambda: work.evaluate(
                    dist.unwrap(model), eval_set, accelerator.device,
                    reports=run_dir / "per_class" / "before" if main else None)) or (None, None)
            if main:
                log.append({"eval": "before", "step": 0, **before})
                tracker.log({f"eval_before/{k}": v for k, v in before.items()}, step=0)
    if main:
        print(f"[multitune] task={task.name} params trainable={trainable:,} total={total:,} "
              f"train rows={len(train_set)} eval rows={len(eval_set)} micro-batches/epoch={len(plan)} "
              f"packing efficiency={efficiency:.1%} steps={total_steps} "
              f"data={'cache hit' if prepared.cache_hit else 'prepared'} {prepared.folder}",
              flush=True)

    batches = stream.iterate(Position(state.epoch, state.index))
    model.train()
    # In a log file (SLURM, CI) a bar redrawn every step floods it: update it every 30 s there instead.
    progress = tqdm(total=total_steps, initial=state.step, disable=not main, desc="train", dynamic_ncols=True,
                    mininterval=0.1 if sys.stderr.isatty() else 30)
    skips_in_a_row = 0
    # The bar is closed on the way out of an error too, so the error line is not glued to it.
    with progress, StopSignals() as stop:
        while state.step < total_steps:
            started = time.perf_counter()
            window: list[MicroBatch] = []
            for _ in range(cfg.grad_accum):
                position, batch = next(batches)
                window.append(batch.to(accelerator.device))
            loss_sum, global_targets, global_tokens = accumulate_gradients(model, window, accelerator, work.loss_sum,
                                                                           dist)
            grad_norm = dist.clip_grad_norm(model, cfg.max_grad_norm)
            loss = loss_sum / max(global_targets, 1.0)
            state.epoch, state.index = position.epoch, position.index
            # Loss and norm are global (reduced over ranks), so every rank takes the same branch. DeepSpeed has
            # already stepped inside backward and may not report a norm: only its loss is checked.
            if not (math.isfinite(loss) and (math.isfinite(grad_norm) or dist.steps_in_backward)):
                skips_in_a_row += 1
                handle_nonfinite(cfg, state, loss, grad_norm, skips_in_a_row, run_dir / "checkpoints", main)
                optimizer.zero_grad(set_to_none=True)  # skipped: this window's data is consumed, nothing updated
                continue
            skips_in_a_row = 0
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state.step += 1
            state.tokens_seen += int(global_tokens)
            elapsed = time.perf_counter() - started
            state.elapsed_s += elapsed
            entry = {"step": state.step, "loss": round(loss, 6), "lr": scheduler.get_last_lr()[0],
                     "grad_norm": round(float(grad_norm), 6), "tokens": int(global_tokens),
                     "tokens_per_s": round(global_tokens / elapsed, 1), "target_tokens": int(global_targets),
                     "epoch": state.epoch, "peak_mem_gb": peak_memory_gb(accelerator.device)}
            if main:
                log.append(entry)
                tracker.log(entry, step=state.step)
                progress.update(1)
                progress.set_postfix(refresh=False, loss=f"{loss:.4f}", lr=f"{entry['lr']:.2e}",
                                     tok_s=f"{entry['tokens_per_s']:.0f}", gnorm=f"{entry['grad_norm']:.2f}")

            saved = None
            if recipe.checkpoint.every_steps and state.step % recipe.checkpoint.every_steps == 0:
                saved = save_checkpoint(run_dir / "checkpoints", model, optimizer, scheduler, state,
                                        recipe.checkpoint.keep_last, dist)
            if recipe.eval.every_steps and state.step % recipe.eval.every_steps == 0 and state.step < total_steps:
                with eager():
                    eval_entry = {"eval": "loss", "step": state.step,
                                  "loss": eval_loss(model, eval_set, recipe, accelerator, work)}
                    eval_entry.update(dist.model_call(
                        lambda: work.step_metrics(dist.unwrap(model), eval_set, accelerator.device)) or {})
                if main:
                    log.append(eval_entry)
                    tracker.log({f"eval/{k}": v for k, v in eval_entry.items() if k not in ("eval", "step")},
                                step=state.step)

            # SIGTERM/SIGUSR1/SIGUSR2 on any rank (preemption, time limit): every rank checkpoints this step and stops.
            signum = stop.agreed(accelerator.device)
            if signum:
                saved = saved or save_checkpoint(run_dir / "checkpoints", model, optimizer, scheduler, state,
                                                 recipe.checkpoint.keep_last, dist)
                tracker.finish()
                raise Preempted(signum, state.step, saved)

    # Outputs: trainable weights gathered once (collective) and saved by the main process as a PEFT adapter (written
    # atomically), final evaluation (on every rank when sharded), metrics, plot.
    unwrapped = dist.unwrap(model)
    weights = dist.gather_trainable(model)
    dist_info = dist.describe(model)
    metrics = None
    if main:
        adapter_dir = work.save(unwrapped, weights, run_dir, data_hash)
    # Evaluation is a model call: on every rank when sharded, else on the main one (None elsewhere).
    with eager():
        after, examples = dist.model_call(lambda: work.evaluate(
            unwrapped, eval_set, accelerator.device, reports=run_dir / "per_class" / "after" if main else None)) \
            or (None, None)
    if main:
        metrics = finish_run(
            run_dir, log, tracker, task, work.how_to_load, dump_recipe(recipe),
            resolvable_base(recipe.model.name_or_path),
            before=before, after=after, examples=examples, adapter_dir=adapter_dir, write_reports=work.write_reports,
            facts={"steps": state.step, "packing_efficiency": efficiency, "nonfinite_skips": state.nonfinite_skips,
                   "train_seconds": round(state.elapsed_s, 2), "trainable_params": trainable, "total_params": total,
                   "data_hash": data_hash, "distributed": dist_info, "notes": work.notes})
    tracker.finish()
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # the accelerator's references to the wrapped model and optimizer: a caller may go on
    return metrics


def eager():
    """A context in which layers compiled by `train.compile` run eagerly: evaluation, whose generation would compile
    anew for its KV-cache shapes and whose no-grad forward would compile a second graph, for a few calls."""
    return torch.compiler.set_stance("force_eager")


def accumulate_gradients(model, window: list[MicroBatch], accelerator: Accelerator, loss_fn: LossFn,
                         dist: Strategy | None = None) -> tuple[float, float, float]:
    """Backward over one optimizer step's micro-batches; returns (summed loss, target tokens, real tokens), global.

    `loss_fn(model, batch)` is the loss summed over the batch's targets. The loss is normalised by the target tokens
    of the whole step across all ranks, so accumulation and packing weigh every token equally (not every
    micro-batch); DDP, FSDP and DeepSpeed average gradients over ranks, hence the world size; DeepSpeed also
    divides by its accumulation steps, which `loss_factor` undoes.
    """
    dist = dist or Strategy(accelerator)
    counts = torch.tensor([sum(b.target_tokens for b in window), sum(b.real_tokens for b in window)],
                          device=accelerator.device, dtype=torch.float64)
    global_targets, global_tokens = accelerator.reduce(counts, reduction="sum").tolist()
    scale = accelerator.num_processes * dist.loss_factor(len(window)) / max(global_targets, 1.0)
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        with dist.gradient_sync(model, sync=last):
            batch_loss = loss_fn(model, batch)
            accelerator.backward(batch_loss * scale)
        loss_sum += batch_loss.detach()
    return accelerator.reduce(loss_sum, reduction="sum").item(), global_targets, global_tokens


@torch.no_grad()
def eval_loss(model, dataset: ShardedDataset, recipe: Recipe, accelerator, work: Workload) -> float:
    """Teacher-forced loss per target over the eval split (each rank its share, summed), in micro-batches of
    similar lengths, one sample per row (no mask, little padding: the order of a sum does not matter here)."""
    plan = plan_micro_batches(dataset.lengths, recipe.data.max_seq_len, recipe.train.micro_batch_tokens, "grouped", 0)
    stream = work.stream(dataset, plan, 0, accelerator.process_index, accelerator.num_processes)
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for group in stream.share(0):
        batch = stream.collate(plan[group] if group >= 0 else []).to(accelerator.device)
        totals[0] += work.loss_sum(model, batch).double()
        totals[1] += batch.target_tokens
    model.train(was_training)
    loss_total, count = accelerator.reduce(totals, reduction="sum").tolist()
    return round(loss_total / max(count, 1.0), 6)


def build_optimizer(model, recipe: Recipe) -> torch.optim.Optimizer:
    cfg = recipe.train
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    import bitsandbytes as bnb

    optimizer_cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return optimizer_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def handle_nonfinite(cfg: TrainConfig, state: TrainState, loss: float, grad_norm: float, in_a_row: int,
                     checkpoints: Path, main: bool) -> None:
    """A NaN/inf loss or gradient norm before optimizer step `state.step + 1`: stop (RunStopped naming the step and
    the checkpoint kept) or, under `train.nonfinite=skip`, count it and return so the loop drops the gradients."""
    step = state.step + 1
    what = f"non-finite loss ({loss})" if not math.isfinite(loss) else f"non-finite gradient norm ({grad_norm})"
    kept = list_checkpoints(checkpoints)
    keep = f"last good checkpoint {kept[-1]} kept" if kept else "no checkpoint written yet"
    if cfg.nonfinite == "stop":
        raise RunStopped(f"{what} at step {step}: run stopped (train.nonfinite=stop); {keep}")
    if in_a_row > cfg.max_nonfinite_skips:
        raise RunStopped(f"{what} at step {step}: {in_a_row} steps in a row non-finite, more than "
                         f"train.max_nonfinite_skips={cfg.max_nonfinite_skips}; run stopped, {keep}")
    state.nonfinite_skips += 1
    if main:
        print(f"[multitune] {what} at step {step}: skipped ({in_a_row} in a row, train.nonfinite=skip)",
              file=sys.stderr, flush=True)
