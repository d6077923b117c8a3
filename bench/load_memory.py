"""Per-rank CPU RAM of loading + sharding a model under FSDP2: rank-0 loading (what `train` does: rank 0 reads, and
for QLoRA quantizes, the model; the others build it on the meta device and receive their shards) versus every rank
loading the whole model (`--ordinary`). Run it under accelerate with 2 processes:

    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --config_file accelerate_configs/fsdp.yaml \
        --num_processes 2 bench/load_memory.py MODEL_DIR [--config CONFIG_DIR] [--ordinary] [--qlora]

Prints one JSON line per rank: resident set size (MiB) before loading, peak during load + shard, after sharding;
and the peak of its anonymous part (`RssAnon`, sampled every 5 ms: what the rank allocated, without the pages of
the memory-mapped checkpoint it read, which the kernel shares between ranks and can drop).
MODEL_DIR is built on first use (run once to build it, then measure): with `--config` (e.g.
recipes/model_configs/Llama-3.2-1B, 1.24B parameters) a random-init model of that config in bfloat16 (QLoRA:
4-bit storage and compute in bfloat16); without, a random-init Llama of hidden 1024, 24 layers (~345M parameters,
1.3 GiB), in float32.
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


class AnonPeak:
    """Largest `RssAnon` of this process seen by a thread sampling /proc/self/status every 5 ms."""

    def __init__(self):
        import threading

        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, anon_mib())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, anon_mib())


def anon_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def build_from_config(config_dir: str, model_dir: str) -> None:
    """A random-init model of the config in `config_dir` (its own initializer), saved in bfloat16 to `model_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if Path(model_dir).exists():
        return
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.bfloat16)
    model.save_pretrained(model_dir)


def main(model_dir: str, config_dir: str | None, ordinary: bool, qlora: bool) -> None:
    import torch
    import torch.distributed as dist

    from multitune.recipes.schema import AdapterConfig, ModelConfig, TinyModelSpec
    from multitune.trainer.distributed import create_strategy, shard_fsdp2
    from multitune.trainer.model import load_model
    from multitune.trainer.tiny_model import ensure_tiny_model

    dtype = "bfloat16" if config_dir else "float32"
    d = create_strategy("fsdp", dtype=dtype)
    accelerator = d.accelerator
    with accelerator.main_process_first():
        if config_dir:
            build_from_config(config_dir, model_dir)
        else:
            ensure_tiny_model(TinyModelSpec(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=8,
                                            intermediate_size=2816), model_dir)
    quant = {"quantization": "nf4", "quant_storage": dtype, "compute_dtype": dtype} if qlora else {}
    config = ModelConfig(name_or_path=model_dir, dtype=dtype, **quant)
    adapter = AdapterConfig(r=8)
    gc.collect()
    before, anon_before = rss_mib(), anon_mib()
    anon = AnonPeak()
    if ordinary:
        model = load_model(config, adapter, torch.device("cpu"), False)
        model = shard_fsdp2(model, dist.get_world_size())
    else:
        model = d.load_model(lambda device, weights: load_model(config, adapter, device, False, weights), qlora)
        model, _ = d.prepare(model, lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad]))
    gc.collect()
    anon_peak = anon.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rank": dist.get_rank(), "mode": "ordinary" if ordinary else "train path",
                      "qlora": qlora, "rss_before_mib": round(before), "peak_mib": round(peak),
                      "peak_increase_mib": round(peak - before), "after_shard_mib": round(rss_mib()),
                      "anon_peak_increase_mib": round(anon_peak - anon_before)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    args = sys.argv[1:]
    config_dir = args[args.index("--config") + 1] if "--config" in args else None
    main(args[0], config_dir, "--ordinary" in args, "--qlora" in args)
