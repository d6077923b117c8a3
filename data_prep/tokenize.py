"""Chat examples → token ids and labels, with the prompt masked (-100) for completion-only loss."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from multitune.data_prep.chat_encoding import chat_encoder

if TYPE_CHECKING:  # tasks import IGNORE from here; a runtime import back would be circular
    from multitune.data_prep.tasks.base import ChatExample

IGNORE = -100


@dataclass
class TokenizedBatch:
    input_ids: list[list[int]]
    labels: list[list[int]]
    prompt_lengths: list[int]


def tokenize_examples(tokenizer, examples: list[ChatExample], completion_only: bool) -> TokenizedBatch:
    """Ids and labels per example through the model's own chat template (`data_prep.chat_encoding`): the prompt is
    what generation sees, the completion is what the template adds for the answer (end-of-turn included), and text
    from the data is encoded as text, control strings included."""
    batch = TokenizedBatch([], [], [])
    if not examples:
        return batch
    encoded = chat_encoder(tokenizer).encode_examples([ex.messages for ex in examples], [ex.answer for ex in examples])
    for row in encoded:
        ids, labels = labelled(row.prompt_ids, row.completion_ids, completion_only)
        batch.input_ids.append(ids)
        batch.labels.append(labels)
        batch.prompt_lengths.append(len(row.prompt_ids))
    return batch


def labelled(prompt: list[int], completion: list[int], completion_only: bool) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one row: the prompt's labels are IGNORE for completion-only loss."""
    return prompt + completion, ([IGNORE] * len(prompt) if completion_only else list(prompt)) + completion


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything in the tokenizer that changes token ids: vocab/merges/normaliser, specials, chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    digest.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    digest.update((tokenizer.chat_template or "").encode())
    return digest.hexdigest()
