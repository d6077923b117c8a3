"""Every place multitune leans on a library's internals or changes a library's global state, in one module.

Each entry names the version it was checked against (`CHECKED_AGAINST`, the pins in constraints.txt) and has a test
in tests/test_compat.py that fails when the library changes under it; pyproject.toml caps the libraries whose
private API is used here. Imports no multitune layer: recipes, data_prep, trainer and launch may all use it.
"""

from __future__ import annotations

import ctypes.util
import glob
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from contextlib import contextmanager

CHECKED_AGAINST = {"torch": "2.13.0", "transformers": "5.23.0", "accelerate": "1.15.0", "bitsandbytes": "0.50.2",
                   "submitit": "1.5.4"}


def quiet_library_noise() -> None:
    """Silence start-up chatter that is not about the user's run (stderr should carry their errors). Environment
    variables only where the user set none."""
    # Tokenizers warn (and disable themselves) when a process forks after using their thread pool.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes 0.50 tries to fetch an optional CPU kernel from the hub on import and warns when it cannot.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` for every adapter it wraps: a
    # FutureWarning on every command about the two libraries' internals, nothing the user can act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # Our own warnings (e.g. eval.max_new_tokens shorter than the answers) say so, as our errors say "error:".
    ours = logging.getLogger("multitune")
    if not any(isinstance(h, StderrWarnings) for h in ours.handlers):
        ours.addHandler(StderrWarnings())

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns on every import that it guessed


class StderrWarnings(logging.StreamHandler):
    """multitune's warnings on whatever sys.stderr is when they are logged (as logging's own last-resort handler
    does; a stream kept from start-up goes stale when a caller swaps stderr), each line prefixed "warning: "."""

    def __init__(self):
        super().__init__()
        self.setLevel(logging.WARNING)  # multitune logs nothing else: its errors are exceptions
        self.setFormatter(logging.Formatter("warning: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


JEMALLOC = "MULTITUNE_JEMALLOC"  # the path of a libjemalloc to use, or "off"
# Freed pages stay with the process, never handed back to the kernel: each step reuses the previous step's pages.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def jemalloc_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-run a multitune command under jemalloc (LD_PRELOAD + MALLOC_CONF), or None: already
    under it, turned off (MULTITUNE_JEMALLOC=off), a machine with an NVIDIA GPU (activations live on the GPU), or no
    jemalloc found (MULTITUNE_JEMALLOC=PATH, else the system's, e.g. Debian/Ubuntu's libjemalloc2).

    Why: on CPU every training step allocates its activations afresh (GBs for a real model); glibc's malloc hands
    large freed blocks back to the kernel, so each step page-faults them in again. SmolLM2-135M, one 8 x 402-token
    micro-batch forward + backward, 2 cores, repeated: glibc 14.7-23.9 s per step with 4-19 s of it in the kernel
    (170k-570k page faults), jemalloc as configured here 10.4-12.8 s with 1.8-4.8 s (31k-82k faults), and 6.9 GB
    peak RSS instead of 10.7 (BENCHMARKS.md has the training runs).
    """
    choice = environ.get(JEMALLOC, "")
    preloaded = environ.get("LD_PRELOAD", "").replace(":", " ").split()
    if choice == "off" or any("jemalloc" in path for path in preloaded) or glob.glob("/dev/nvidia[0-9]*"):
        return None
    if choice and not os.path.isfile(choice):
        logging.getLogger(__name__).warning("%s=%s: no such file; running without jemalloc", JEMALLOC, choice)
        return None
    library = choice or ctypes.util.find_library("jemalloc")
    if not library or library in preloaded:  # the re-run process itself: never re-run twice
        return None
    preload = " ".join([library, *preloaded])
    return {**environ, "LD_PRELOAD": preload, "MALLOC_CONF": environ.get("MALLOC_CONF") or JEMALLOC_CONF}


def single_threaded_tokenizers() -> None:
    """For a tokenizing worker process (one per core): the tokenizers' own thread pool would only oversubscribe."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def without_accelerate_fsdp() -> None:
    """accelerate 1.15 turns `prepare` into its own FSDP wrapping when ACCELERATE_USE_FSDP is set (as `accelerate
    launch` with an FSDP config does); we shard with torch's `fully_shard` ourselves and want only its process
    group."""
    os.environ.pop("ACCELERATE_USE_FSDP", None)


def keep_4bit_weights_differentiable(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    bitsandbytes 0.50 (private flag `Linear4bit.support_avx512bf16_for_cpu`): on CPUs with AVX512-BF16, the first
    no-grad forward in eval mode (our before-training evaluation) repacks each Linear4bit for `gemv_4bit`,
    permanently; that kernel has no autograd, so every later training step silently loses the gradient through the
    frozen 4-bit layers (only LoRA branches and residuals carry it).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def attn_implementation(config) -> str:
    """The attention backend transformers 5.23 really chose for a loaded model (`config._attn_implementation`,
    private: the public `attn_implementation` is what was asked for, not what a fallback gave)."""
    return config._attn_implementation


def fsdp_offloads_to_cpu(module) -> bool:
    """Whether `module` is an FSDP2 unit whose shards live in CPU RAM. torch 2.13 has no public accessor for a
    unit's offload policy: this reads `_get_fsdp_state()._fsdp_param_group.offload_policy`."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    if not isinstance(module, FSDPModule):  # not hasattr: PEFT wrappers forward attribute lookups to the model
        return False
    group = getattr(module._get_fsdp_state(), "_fsdp_param_group", None)
    return group is not None and isinstance(group.offload_policy, CPUOffloadPolicy)


@contextmanager
def without_hf_deepspeed_config(plugin):
    """transformers 5.23 decides on zero.Init from the global DeepSpeed config accelerate 1.15 registers (whatever
    the plugin's zero3_init_flag says): unregister it while loading, register it again for generation and saving."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def gguf_architectures() -> list[str]:
    """Model architectures transformers 5.23's GGUF reader loads (its mapping table lives in a private-looking
    module, `modeling_gguf_pytorch_utils`)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # mapping sections, not models


def submitit_sbatch_script(folder, python: str, parameters: dict) -> str:
    """The sbatch script submitit 1.5.4 writes for a job in `folder`, from its own (private) renderer and the command
    `SlurmExecutor._submitit_command_str` builds; tests/test_slurm.py compares it with a real submission's."""
    import shlex

    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **parameters)


def quantize_on_meta(model, quantization_config, dtype) -> None:
    """Turn a model built on the meta device into the structure `from_pretrained(quantization_config=...)` gives,
    allocating nothing: transformers' own bitsandbytes quantizer picks and replaces the Linear layers (the same
    choice as a real load, e.g. lm_head kept), then each `Linear4bit` weight is "quantized" on the meta device.
    bitsandbytes' meta kernels give the packed storage's shape ((out x in / 2 bytes) / storage item size, 1) in
    `quant_storage` dtype and a `QuantState` whose tensors (absmax uint8 per 64 weights, nested absmax fp32 per
    256 absmax, the 16-entry NF4 code, the 256-entry nested code, the offset) are meta tensors of the real shapes:
    templates for the values rank 0 broadcasts (`trainer/distributed.py: broadcast_quant_states`). `dtype` is what
    the weights are loaded in before quantizing (the recipe's `model.dtype`), recorded in each state.

    Leans on transformers 5.23's quantizer hooks (`HfQuantizer.preprocess_model`/`postprocess_model` and the
    `hf_quantizer` attribute, what `from_pretrained` does around loading) and on bitsandbytes 0.50's meta kernels
    and its cache of the 8-bit code (see `_double_quant_on_meta`).
    """
    import bitsandbytes as bnb
    import torch
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization_config)
    quantizer.preprocess_model(model, device_map=None)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            packed, state = bnb.functional.quantize_4bit(
                torch.empty(weight.shape, dtype=dtype, device="meta"), blocksize=weight.blocksize,
                compress_statistics=False, quant_type=weight.quant_type, quant_storage=weight.quant_storage)
            if weight.compress_statistics:
                state = _double_quant_on_meta(state)
            module.weight = bnb.nn.Params4bit(
                packed, requires_grad=False, quant_state=state, blocksize=weight.blocksize,
                compress_statistics=weight.compress_statistics, quant_type=weight.quant_type,
                quant_storage=weight.quant_storage, module=module, bnb_quantized=True)
            module.quant_state = state
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer


def _double_quant_on_meta(state):
    """The double-quantized form of a meta `QuantState`, as `quantize_4bit(compress_statistics=True)` builds it
    (absmax minus its mean, 8-bit blockwise in blocks of 256), with the 8-bit code passed in: left to choose it,
    bitsandbytes caches the code it makes on the input's device, and a meta code would then break every real
    quantization later in this process."""
    import bitsandbytes as bnb

    offset = state.absmax.mean()
    absmax, nested = bnb.functional.quantize_blockwise(
        state.absmax - offset, code=bnb.functional.create_dynamic_map().to("meta"), blocksize=256)
    return bnb.functional.QuantState(absmax=absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                                     quant_type=state.quant_type, dtype=state.dtype, offset=offset, state2=nested)
