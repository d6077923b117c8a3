"""Chat examples → token ids and labels, with the prompt masked (-100) for completion-only loss."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from recipes.errors import InputError

if TYPE_CHECKING:  # tasks import IGNORE from here; a runtime import back would be circular
    from data_prep.tasks.base import ChatExample

IGNORE = -100
PREFIX_ERROR = ("the tokenizer's chat template renders the prompt differently with and without the answer; "
                "completion-only labels need a template whose generation prompt is a prefix of the full conversation")


@dataclass
class TokenizedBatch:
    input_ids: list[list[int]]
    labels: list[list[int]]
    prompt_lengths: list[int]


def split_prompts_completions(tokenizer, examples: list[ChatExample]) -> tuple[list[str], list[str]]:
    """Render with the model's own chat template; a completion is what the template adds for the answer.

    Tokenizing prompt and completion separately keeps the prompt ids identical to what generation sees at
    inference time, and the completion keeps the template's end-of-turn tokens, whatever the template.
    One batched template call per side is ~2x faster than a call per example (measured).
    """
    prompts = tokenizer.apply_chat_template([ex.messages for ex in examples], add_generation_prompt=True,
                                            tokenize=False)
    fulls = tokenizer.apply_chat_template(
        [[*ex.messages, {"role": "assistant", "content": ex.answer}] for ex in examples], tokenize=False)
    for prompt, full in zip(prompts, fulls):
        if not full.startswith(prompt):
            raise InputError(PREFIX_ERROR)
    return prompts, [full[len(prompt):] for prompt, full in zip(prompts, fulls)]


def tokenize_examples(tokenizer, examples: list[ChatExample], completion_only: bool) -> TokenizedBatch:
    if not examples:
        return TokenizedBatch([], [], [])
    prompts, completions = split_prompts_completions(tokenizer, examples)
    prompt_ids, completion_ids = token_ids(tokenizer, prompts), token_ids(tokenizer, completions)
    batch = TokenizedBatch([], [], [])
    for p, c in zip(prompt_ids, completion_ids):
        batch.input_ids.append(p + c)
        batch.labels.append(([IGNORE] * len(p) if completion_only else list(p)) + c)
        batch.prompt_lengths.append(len(p))
    return batch


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`, through the Rust backend's `encode_batch_fast` when
    there is one: it skips character offsets and the Python-side conversion, 1.7x faster on prep's prompts (measured,
    identical ids; tested)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything in the tokenizer that changes token ids: vocab/merges/normaliser, specials, chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    digest.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    digest.update((tokenizer.chat_template or "").encode())
    return digest.hexdigest()
