"""multitune/compat.py, entry by entry: each test fails when the library it leans on changes under it."""

from __future__ import annotations

import inspect
import os
from importlib.metadata import version

import pytest
import torch

from multitune import compat

pytestmark = pytest.mark.unit


def test_installed_libraries_are_the_versions_compat_was_checked_against():
    """Bumping a pin in constraints.txt lands here first: re-check every entry of compat.py, then the version."""
    installed = {name: version(name).split("+")[0] for name in compat.CHECKED_AGAINST}
    assert installed == compat.CHECKED_AGAINST


def test_4bit_layers_keep_their_gradient_path_after_a_no_grad_forward():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
    # The flag we clear is what bitsandbytes' forward reads before repacking for its no-autograd CPU kernel.
    assert "support_avx512bf16_for_cpu" in vars(layer)
    assert "self.support_avx512bf16_for_cpu" in inspect.getsource(bnb.nn.Linear4bit.forward)
    model = torch.nn.Sequential(layer)
    compat.keep_4bit_weights_differentiable(model)
    assert layer.support_avx512bf16_for_cpu is False


@pytest.mark.parametrize("requested", ["eager", "sdpa"])
def test_attn_implementation_is_the_backend_the_model_runs(requested):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=requested)
    assert compat.attn_implementation(model.config) == requested


def test_fsdp_offload_policy_is_read_from_each_unit(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        offloaded, kept = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        fully_shard(offloaded, mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=False))
        fully_shard(kept, mesh=mesh)
        assert compat.fsdp_offloads_to_cpu(offloaded) is True
        assert compat.fsdp_offloads_to_cpu(kept) is False
        assert compat.fsdp_offloads_to_cpu(torch.nn.Linear(4, 4)) is False  # not an FSDP unit at all
    finally:
        dist.destroy_process_group()


def test_hf_deepspeed_config_is_off_inside_and_back_after():
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations import is_deepspeed_zero3_enabled

    plugin = DeepSpeedPlugin(zero_stage=3, zero3_init_flag=True)
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
    plugin.set_deepspeed_weakref()
    assert is_deepspeed_zero3_enabled()
    with compat.without_hf_deepspeed_config(plugin):
        assert not is_deepspeed_zero3_enabled()  # from_pretrained here loads normally, no zero.Init
    assert is_deepspeed_zero3_enabled()
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def test_accelerate_reads_the_fsdp_variable_we_clear(monkeypatch):
    import accelerate.state

    assert "ACCELERATE_USE_FSDP" in inspect.getsource(accelerate.state)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    compat.without_accelerate_fsdp()
    assert "ACCELERATE_USE_FSDP" not in os.environ


def test_gguf_reader_architectures_include_llama_and_qwen2():
    architectures = compat.gguf_architectures()
    assert {"llama", "qwen2"} <= set(architectures)
    assert "tokenizer" not in architectures and "general" not in architectures


def test_submitit_renders_the_script_it_submits(tmp_path):
    script = compat.submitit_sbatch_script(tmp_path, "/usr/bin/python3", {"nodes": 2, "ntasks_per_node": 4})
    assert script.startswith("#!/bin/bash")
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=4" in script
    assert f"-u -m submitit.core._submit {tmp_path}" in script


def test_library_noise_settings_leave_the_users_own_values(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    compat.quiet_library_noise()
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    if not torch.cuda.is_available():
        assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_peft_wrapping_is_quiet_and_our_own_warnings_say_warning(tiny_model_dir, capsys):
    import logging
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def deprecation_warnings() -> list[str]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # no once-per-location memory from earlier tests
            if quiet:
                compat.quiet_library_noise()  # its filter goes in front of "always"
            get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
        return [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)]

    quiet = False
    assert deprecation_warnings()  # peft + transformers as pinned do warn: the filter has something to do
    quiet = True
    assert deprecation_warnings() == []
    compat.quiet_library_noise()  # twice in one process (tests, sweeps): still one handler
    assert sum(isinstance(h, compat.StderrWarnings) for h in logging.getLogger("multitune").handlers) == 1
    capsys.readouterr()
    logging.getLogger("multitune.trainer.evaluate").warning("eval.max_new_tokens=6 is shorter than 4 of the 4")
    assert capsys.readouterr().err == "warning: eval.max_new_tokens=6 is shorter than 4 of the 4\n"


@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_model_built_on_meta_has_the_structure_of_a_real_load(tmp_path, double_quant):
    """`quantize_on_meta` (what FSDP2 ranks > 0 build for QLoRA, `load_model(weights=False)`): no parameter
    bytes, but the parameters (names, packed 4-bit shapes, storage dtypes) and quantization-state layout of a real
    quantizing load; and building it first must not disturb a real load in the same process (bitsandbytes caches
    the 8-bit code of double quantization on the device it first runs on: a meta code broke every later load)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from multitune.recipes.schema import AdapterConfig, ModelConfig
    from multitune.trainer.distributed import _linear4bit_modules, _materialised_bytes, _quant_state_layout
    from multitune.trainer.model import load_model

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = ModelConfig(name_or_path=str(tmp_path), dtype="float32", compute_dtype="float32", quantization="nf4",
                        quant_storage="float32", double_quant=double_quant)
    meta = load_model(model, AdapterConfig(r=4), torch.device("cpu"), False, weights=False)
    real = load_model(model, AdapterConfig(r=4), torch.device("cpu"), False)
    assert _materialised_bytes(meta) == 0 and _materialised_bytes(real) > 0

    def layout(m):
        return {n: (tuple(p.shape), p.dtype, type(p).__name__, p.requires_grad) for n, p in m.named_parameters()}

    assert layout(meta) == layout(real)
    states = [[_quant_state_layout(m.quant_state) for m in _linear4bit_modules(x)] for x in (meta, real)]
    assert len(states[0]) == 14 and states[0] == states[1]
    assert all(m.quant_state.absmax.is_meta for m in _linear4bit_modules(meta))
    assert all(m.quant_state.nested == double_quant for m in _linear4bit_modules(real))
    assert meta.is_loaded_in_4bit and type(meta.hf_quantizer) is type(real.hf_quantizer)


def test_jemalloc_env_preloads_the_chosen_library_once_and_keeps_the_users_settings(tmp_path):
    """`multitune` re-runs itself under jemalloc on CPU machines: with its pages kept unless the user configured
    jemalloc, after any preload the user set, never twice, and not at all when turned off or the file is missing."""
    library = tmp_path / "libjemalloc.so.2"
    library.write_bytes(b"")
    env = compat.jemalloc_env({compat.JEMALLOC: str(library), "LD_PRELOAD": "/opt/libother.so", "KEEP": "1"})
    assert env["LD_PRELOAD"] == f"{library} /opt/libother.so" and env["KEEP"] == "1"
    assert env["MALLOC_CONF"] == compat.JEMALLOC_CONF == "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    assert compat.jemalloc_env({compat.JEMALLOC: str(library), "MALLOC_CONF": "narenas:2"})["MALLOC_CONF"] \
        == "narenas:2"
    assert compat.jemalloc_env(env) is None  # the re-run process does not re-run again
    assert compat.jemalloc_env({compat.JEMALLOC: "off"}) is None
    assert compat.jemalloc_env({compat.JEMALLOC: str(tmp_path / "missing.so")}) is None


def test_the_multitune_command_re_runs_itself_under_jemalloc(tmp_path, monkeypatch):
    """`entry` (the `multitune` command) replaces its process with `python -m multitune ARGS` under the jemalloc
    environment; `main`, which tests call in-process, never does."""
    import sys

    from multitune.launch import cli

    library = tmp_path / "libjemalloc.so.2"
    library.write_bytes(b"")
    monkeypatch.setenv(compat.JEMALLOC, str(library))
    monkeypatch.setattr(sys, "argv", ["/venv/bin/multitune", "plan", "r.yaml", "--gpus", "2"])
    calls = []

    def execve(path, args, env):
        calls.append((path, args, env))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", execve)
    with pytest.raises(SystemExit):
        cli.entry()
    (path, args, env), = calls
    assert path == sys.executable and args == [sys.executable, "-m", "multitune", "plan", "r.yaml", "--gpus", "2"]
    assert env["LD_PRELOAD"].split()[0] == str(library)
