"""Tiny models with other chat formats than the Mistral one of the test model, written here for the text-safety
tests: a ChatML model whose eos (<|endoftext|>) is not its end-of-turn (<|im_end|>), and a Gemma-style template
that refuses the system role."""

from __future__ import annotations

import json
from pathlib import Path

# ChatML as Qwen2 and SmolLM2 write it; turns end with <|im_end|>, the tokenizer's eos is <|endoftext|>.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's template in its essentials: no system role (it raises), turns end with <end_of_turn>, contents trimmed.
NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]


def byte_level_tokenizer(chat_template: str, eos: str, bos: str | None = None):
    """A Qwen-style byte-level BPE (1,000 tokens, trained here on generated tickets in well under a second) with
    the chat format's control tokens as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from multitune.data_prep.tasks import get_task

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [json.dumps(r) for r in get_task("ticket_classification").generate(400, seed=0)]
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIALS,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, bos_token=bos,
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = chat_template
    return tokenizer


def chatml_tokenizer():
    return byte_level_tokenizer(CHATML_TEMPLATE, eos="<|endoftext|>")


def no_system_tokenizer():
    return byte_level_tokenizer(NO_SYSTEM_TEMPLATE, eos="<eos>", bos="<bos>")


def build_model(tokenizer, out: Path) -> Path:
    """A tiny random-init Llama with `tokenizer`; its generation config names only the tokenizer's eos."""
    from multitune.recipes.schema import TinyModelSpec
    from multitune.trainer.tiny_model import build_tiny_model

    spec = TinyModelSpec(arch="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=128)
    return build_tiny_model(spec, out, tokenizer=tokenizer)
