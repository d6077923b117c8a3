"""Per-rank CPU RAM of loading + sharding a model under FSDP2: rank-0 load + broadcast (what `train` does) versus
every rank loading the whole model (`--ordinary`). Run it under accelerate with 2 processes:

    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --config_file accelerate_configs/fsdp.yaml \
        --num_processes 2 bench/load_memory.py MODEL_DIR [--ordinary] [--qlora]

Prints one JSON line per rank: resident set size (MiB) before loading, peak during load + shard, after sharding.
MODEL_DIR is built on first use (random-init Llama, hidden 1024, 24 layers: ~345M parameters, 1.3 GiB in fp32;
run once to build it, then measure).
"""

from __future__ import annotations

import gc
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main(model_dir: str, ordinary: bool, qlora: bool) -> None:
    import torch
    import torch.distributed as dist

    from multitune.recipes.schema import AdapterConfig, ModelConfig, TinyModelSpec
    from multitune.trainer.distributed import create_strategy, shard_fsdp2
    from multitune.trainer.model import load_model
    from multitune.trainer.tiny_model import ensure_tiny_model

    spec = TinyModelSpec(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=8, intermediate_size=2816)
    d = create_strategy("fsdp")
    accelerator = d.accelerator
    with accelerator.main_process_first():
        ensure_tiny_model(spec, model_dir)
    quant = {"quantization": "nf4", "quant_storage": "float32", "compute_dtype": "float32"} if qlora else {}
    config = ModelConfig(name_or_path=model_dir, dtype="float32", **quant)
    adapter = AdapterConfig(r=8)
    gc.collect()
    before = rss_mib()
    if ordinary:
        model = load_model(config, adapter, torch.device("cpu"), False)
        model = shard_fsdp2(model, dist.get_world_size())
    else:
        model = d.load_model(lambda device, weights: load_model(config, adapter, device, False, weights), qlora)
        model, _ = d.prepare(model, lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad]))
    gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rank": dist.get_rank(), "mode": "ordinary" if ordinary else "train path",
                      "qlora": qlora, "rss_before_mib": round(before), "peak_mib": round(peak),
                      "after_shard_mib": round(rss_mib())}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], "--ordinary" in sys.argv, "--qlora" in sys.argv)
