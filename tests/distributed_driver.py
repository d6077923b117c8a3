"""Runs inside `accelerate launch` (every rank): for each recipe, train, cut the run back to its first checkpoint,
and resume it in the same process group, so one launch checks several methods (and, for DeepSpeed, stages: each
recipe's own accelerate config decides its stage and offload) of one strategy family.

Writes next to each run: `log.full.jsonl` and `metrics.full.json` (the uninterrupted run); with `--coverage`,
`coverage.json` (which samples each rank's stream yields in epoch 0); with `--load-check`, `load_check.json` (see
`check_loading`, and `check_4bit_loading` for FSDP2 QLoRA recipes).
"""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
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
    from multitune.data_prep.prepare import prepare
    from multitune.data_prep.shards import ShardedDataset
    from multitune.data_prep.tasks import get_task
    from multitune.trainer.batches import MicroBatchStream, batch_layout, plan_micro_batches
    from multitune.trainer.model import load_tokenizer

    data = ShardedDataset(prepare(get_task(recipe.task), recipe.data, load_tokenizer(recipe.model)).split("train"))
    layout = batch_layout(recipe.data.packing, recipe.data.group_by_length)
    plan = plan_micro_batches(data.lengths, recipe.data.max_seq_len, recipe.train.micro_batch_tokens, layout,
                              recipe.train.seed)
    stream = MicroBatchStream(data, plan, recipe.train.seed, dist.get_rank(), dist.get_world_size())
    mine = [int(i) for group in stream.share(0) if group >= 0 for row in plan[group] for i in row]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        (recipe.output_path / "coverage.json").write_text(json.dumps({"rows": len(data), "per_rank": everyone}))


def check_loading(recipe) -> None:
    """Load and shard the recipe's model the way `train` does, then compare it with an ordinary full load on this
    rank: the gathered state dict (rank 0) and the logits of one forward (every rank; buffers included). Writes
    `load_check.json`: how each rank built its model and what it held before sharding, and the differences."""
    import torch
    from accelerate.utils import set_seed
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from multitune.compat import without_hf_deepspeed_config
    from multitune.recipes.accelerate_config import deepspeed_settings
    from multitune.trainer.distributed import DeepSpeed, create_strategy
    from multitune.trainer.model import load_model

    dist_ = create_strategy(recipe.distributed.strategy, dtype=recipe.model.dtype,
                            deepspeed=deepspeed_settings(recipe))
    accelerator = dist_.accelerator
    set_seed(recipe.train.seed)
    model = dist_.load_model(lambda device, weights: load_model(recipe.model, recipe.adapter, device, False, weights),
                             quantized=recipe.model.quantization == "nf4")
    model, _ = dist_.prepare(model, lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0))
    set_seed(recipe.train.seed)
    plugin = accelerator.state.deepspeed_plugin if isinstance(dist_, DeepSpeed) else None
    with without_hf_deepspeed_config(plugin) if plugin else nullcontext():  # the ordinary load, no zero.Init
        reference = load_model(recipe.model, recipe.adapter, torch.device("cpu"), False)
    ids = torch.arange(1, 33).reshape(2, 16)
    model.eval()
    reference.eval()
    with torch.no_grad():
        logits_diff = (model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max().item()
    if dist_.name == "fsdp":
        gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        import deepspeed

        params = list(dist_.unwrap(model).parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            gathered = {n: p.detach().cpu().clone() for n, p in dist_.unwrap(model).named_parameters()}
    expected = reference.state_dict()
    result = {"load_per_rank": _everyone(dist_.load_info), "logits_max_diff": _everyone(logits_diff),
              "full_bytes": sum(p.numel() * p.element_size() for p in reference.parameters())}
    if dist.get_rank() == 0:
        result["state_keys_compared"] = len(gathered)
        # DeepSpeed's gather is of parameters only; FSDP's state dict must have exactly the ordinary keys
        unmatched = set(gathered) ^ set(expected) if dist_.name == "fsdp" else set(gathered) - set(expected)
        result["unmatched_keys"] = sorted(unmatched)[:5]
        result["state_max_diff"] = max((gathered[k].float() - expected[k].float()).abs().max().item()
                                       for k in gathered)
        recipe.output_path.parent.mkdir(parents=True, exist_ok=True)
        (recipe.output_path.parent / "load_check.json").write_text(json.dumps(result))
    dist.barrier()
    AcceleratorState._reset_state()


def check_4bit_loading(recipe) -> None:
    """FSDP2 QLoRA: load and shard the recipe's model the way `train` does (rank 0 quantizes, rank 1 builds it on
    meta and receives its shard and the quantization states), and again the per-rank way (every rank quantizes the
    whole model, then `fully_shard`). Every rank compares its own shards (4-bit storage, LoRA, norms, embeddings)
    and every `Linear4bit`'s quantization state bit for bit, and the logits of one forward. Writes
    `load_check.json` with how each rank built its model and what it found."""
    import torch
    from accelerate.utils import set_seed

    from multitune.recipes.accelerate_config import fsdp_offload_params
    from multitune.trainer.distributed import (
        _linear4bit_modules,
        _local,
        _materialised_bytes,
        create_strategy,
        shard_fsdp2,
    )
    from multitune.trainer.model import load_model

    offload = fsdp_offload_params(recipe)
    dist_ = create_strategy("fsdp", dtype=recipe.model.dtype, offload_params=offload)
    set_seed(recipe.train.seed)
    model = dist_.load_model(lambda device, weights: load_model(recipe.model, recipe.adapter, device, False, weights),
                             quantized=True)
    model, _ = dist_.prepare(model, lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0))
    set_seed(recipe.train.seed)
    reference = load_model(recipe.model, recipe.adapter, torch.device("cpu"), False)
    full_bytes = _materialised_bytes(reference)
    reference = shard_fsdp2(reference, dist.get_world_size(), offload=offload)
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    differing = sorted(n for n in ours if not torch.equal(_bits(_local(ours[n])), _bits(_local(theirs[n]))))
    states = 0
    differing_states = []
    for a, b in zip(_linear4bit_modules(model), _linear4bit_modules(reference), strict=True):
        qa, qb = a.quant_state, b.quant_state
        pairs = [(qa.absmax, qb.absmax), (qa.code, qb.code)]
        if qa.nested:
            pairs += [(qa.offset, qb.offset), (qa.state2.absmax, qb.state2.absmax), (qa.state2.code, qb.state2.code)]
        same = all(x.device.type != "meta" and torch.equal(_bits(x), _bits(y)) for x, y in pairs) and \
            (qa.shape, qa.dtype, qa.blocksize, qa.quant_type) == (qb.shape, qb.dtype, qb.blocksize, qb.quant_type)
        states += 1
        if not same:
            differing_states.append(states - 1)
    ids = torch.arange(1, 33).reshape(2, 16)
    model.eval()
    reference.eval()
    with torch.no_grad():
        logits_diff = (model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max().item()
    result = {"load_per_rank": _everyone(dist_.load_info), "logits_max_diff": _everyone(logits_diff),
              "full_bytes": full_bytes,
              "params_compared": _everyone(len(ours)), "differing_params": _everyone(differing[:5]),
              "quant_states_compared": _everyone(states), "differing_quant_states": _everyone(differing_states[:5]),
              "quantized_params": _everyone(sum(n.endswith("base_layer.weight") for n in ours))}
    if dist.get_rank() == 0:
        recipe.output_path.parent.mkdir(parents=True, exist_ok=True)
        (recipe.output_path.parent / "load_check.json").write_text(json.dumps(result))
    del model, reference
    dist.barrier()
    AcceleratorState._reset_state()


def _bits(tensor):
    """The bytes of `tensor`: packed 4-bit weights stored as floats include NaN bit patterns (NaN != NaN)."""
    return tensor.detach().contiguous().view(-1).view(torch.uint8)


def _everyone(value) -> list:
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def main(paths: list[str]) -> None:
    from multitune.recipes.loader import load_recipe
    from multitune.trainer.distributed import leave_process_group
    from multitune.trainer.loop import train

    coverage = "--coverage" in paths
    load_check = "--load-check" in paths
    for path in [p for p in paths if not p.startswith("--")]:
        recipe = load_recipe(path, [])
        if load_check and recipe.model.quantization == "none":
            check_loading(recipe)
        elif load_check and recipe.distributed.strategy == "fsdp":
            check_4bit_loading(recipe)
        train(recipe)
        if dist.get_rank() == 0:
            cut_back_to_first_checkpoint(recipe.output_path)
        dist.barrier()
        AcceleratorState._reset_state()  # a fresh Accelerator (and DeepSpeed plugin) for the resumed run
        train(recipe, resume=True)
        AcceleratorState._reset_state()
        if coverage:
            sample_coverage(recipe)
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
