"""Runs inside `accelerate launch` (every rank): for each recipe, train, cut the run back to its first checkpoint,
and resume it in the same process group, so one launch checks several methods of one strategy.

Writes next to each run: `log.full.jsonl` and `metrics.full.json` (the uninterrupted run); with `--coverage`,
`coverage.json` (which samples each rank's stream yields in epoch 0).
"""

from __future__ import annotations

import json
import shutil
import sys

from pathlib import Path

import torch.distributed as dist
from accelerate.state import AcceleratorState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's code, not an installed copy


def cut_back_to_first_checkpoint(run) -> None:
    shutil.copy(run / "log.jsonl", run / "log.full.jsonl")
    shutil.copy(run / "metrics.json", run / "metrics.full.json")
    checkpoints = sorted((run / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    for later in checkpoints[1:]:
        shutil.rmtree(later)
    shutil.rmtree(run / "adapter")


def sample_coverage(recipe) -> None:
    """The exact stream the loop builds on this rank (same plan, seed, rank, world size): samples it yields."""
    from data_prep.prepare import prepare
    from data_prep.shards import ShardedDataset
    from data_prep.tasks import get_task
    from trainer.batches import MicroBatchStream, plan_micro_batches
    from trainer.model import load_tokenizer

    data = ShardedDataset(prepare(get_task(recipe.task), recipe.data, load_tokenizer(recipe.model)).split("train"))
    plan = plan_micro_batches(data.lengths, recipe.data.max_seq_len, recipe.train.micro_batch_tokens,
                              recipe.data.packing, recipe.train.seed)
    stream = MicroBatchStream(data, plan, recipe.train.seed, dist.get_rank(), dist.get_world_size())
    mine = [int(i) for group in stream.share(0) if group >= 0 for row in plan[group] for i in row]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        (recipe.output_path / "coverage.json").write_text(json.dumps({"rows": len(data), "per_rank": everyone}))


def main(paths: list[str]) -> None:
    from recipes.loader import load_recipe
    from trainer.loop import train

    coverage = "--coverage" in paths
    for path in [p for p in paths if p != "--coverage"]:
        recipe = load_recipe(path, [])
        train(recipe)
        if dist.get_rank() == 0:
            cut_back_to_first_checkpoint(recipe.output_path)
        dist.barrier()
        AcceleratorState._reset_state()  # a fresh Accelerator (and DeepSpeed plugin) for the resumed run
        train(recipe, resume=True)
        AcceleratorState._reset_state()
        if coverage:
            sample_coverage(recipe)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
