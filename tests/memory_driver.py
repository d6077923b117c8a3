"""Measure the peak RSS of LoRA training steps of a model built from CONFIG_DIR (run in its own process).

Usage: python tests/memory_driver.py CONFIG_DIR TOKENS CHECKPOINTING(0/1) R DROPOUT; prints the peak RSS increase
over a baseline taken after all imports, in bytes, as JSON.
"""

import json
import sys


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> None:
    config_dir, tokens, checkpointing, r, dropout = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", \
        int(sys.argv[4]), float(sys.argv[5])
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(config_dir)
    # Warm-up on a minute copy of the model: lazily loaded kernels' code pages count in RSS, not in the planner.
    small = config.__class__(**{**config.to_dict(), "hidden_size": 32, "intermediate_size": 64, "vocab_size": 64,
                                "head_dim": 8})
    run(small, torch.randint(0, 64, (1, 16)), checkpointing, r, dropout, AutoModelForCausalLM, LoraConfig,
        get_peft_model, F)
    baseline = rss_kib("VmRSS")
    run(config, torch.randint(0, config.vocab_size, (1, tokens)), checkpointing, r, dropout, AutoModelForCausalLM,
        LoraConfig, get_peft_model, F)
    print(json.dumps({"peak_delta": (rss_kib("VmHWM") - baseline) * 1024}))


def run(config, ids, checkpointing, r, dropout, AutoModelForCausalLM, LoraConfig, get_peft_model, F) -> None:
    import torch

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):  # the second step runs with the optimizer state already allocated
        out = model(input_ids=ids, use_cache=False)
        logits = out.logits.float()
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del out, logits, loss


if __name__ == "__main__":
    main()
