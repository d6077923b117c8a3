"""Random-init tiny Llama/Qwen2-style causal LMs with a real tokenizer (shipped in mistral-common), for debug runs and
tests."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from multitune.atomic import atomic_dir
from multitune.recipes.schema import TinyModelSpec

SPEC_FILE = "multitune_tiny.json"  # marks a folder as a debug model we built, with the spec it was built from

# Mistral-instruct style; `{% generation %}` marks the assistant span so template-based assistant masks work too.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set system = namespace(text='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system.text = message['content'] + '\n\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + system.text + message['content'] + ' [/INST]' }}"
    "{% set system.text = '' %}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ ' ' + message['content'] + eos_token }}"
    "{% endgeneration %}{% endif %}{% endfor %}"
)


def mistral_tokenizer_file() -> Path:
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"mistral-common does not ship {path.name}; reinstall mistral-common")
    return path


def build_tokenizer(out: Path):
    """The Mistral-7B v0.1 SentencePiece tokenizer (32k vocab) with a chat template, saved as a fast tokenizer."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(mistral_tokenizer_file(), Path(tmp) / "tokenizer.model")
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return tokenizer


def build_tiny_model(spec: TinyModelSpec, out: str | Path, tokenizer=None) -> Path:
    """Write a random-init model + tokenizer to `out` atomically (temporary folder, then rename). The tokenizer is
    the Mistral one unless given (tests use other chat formats); its eos is the model's eos."""
    out = Path(out)
    # Trials of a sweep start side by side on a fresh checkout and may all build the same model: whoever is first
    # wins, the others keep its (identical) folder rather than deleting it under a running trial. An outdated debug
    # model of ours (see ensure_tiny_model) is replaced.
    with atomic_dir(out, keep_existing=lambda done: _built_from(done, spec)) as tmp:
        if tokenizer is None:
            tokenizer = build_tokenizer(tmp)
        else:
            tokenizer.save_pretrained(tmp)
        common = dict(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            intermediate_size=spec.intermediate_size,
            max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            initializer_range=spec.init_std,
        )
        config = LlamaConfig(**common) if spec.arch == "llama" else Qwen2Config(**common)
        # The weights come from spec.seed alone, and the caller's random state is left as it was: a training run
        # that builds its debug model first must train exactly like one that finds it built.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            with torch.no_grad():
                model.lm_head.weight.normal_(0.0, spec.head_init_std)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        (tmp / SPEC_FILE).write_text(json.dumps(spec.model_dump(), sort_keys=True))
    return out


def _built_from(path: Path, spec: TinyModelSpec) -> bool:
    marker = path / SPEC_FILE
    return marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(spec.model_dump()))


def ensure_tiny_model(spec: TinyModelSpec, path: str | Path) -> None:
    """Build the debug model if missing, or rebuild it when the recipe's spec changed; never touch other folders."""
    path = Path(path)
    if not path.exists() or ((path / SPEC_FILE).is_file() and not _built_from(path, spec)):
        build_tiny_model(spec, path)
