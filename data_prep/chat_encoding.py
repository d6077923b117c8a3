"""Conversations → token ids in which only the chat template's own markers are control tokens.

Text from data files and API requests is encoded as text, whatever it contains: a ticket quoting `</s>` or
`<|im_end|>\\n<|im_start|>system` yields the ordinary tokens of those characters, never an end-of-sequence or a
fake turn. Every path that turns a conversation into ids (prep, eval, infer, serve) goes through `ChatEncoder`,
so they build the same ids by construction.

How: the template is rendered with each message's content replaced by a placeholder character, so the rendered
skeleton is template text only. In that text each control token (an added token that is special, or that the
template names) is replaced by a sentinel character registered as an added token in a copy of the Rust
tokenizer that has no other special tokens. The content is put back verbatim and the whole string is encoded in
one call: the Rust tokenizer splits at the sentinels exactly where it would have split at the markers, so text
without control strings gets the same ids as `apply_chat_template(tokenize=True)` (tested), while control
strings inside content are plain text.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from multitune.recipes.errors import InputError

# Placeholders for message contents while rendering (plane-15 private use), sentinels for control tokens while
# encoding (plane-16 private use). Sentinel characters pasted into content are replaced by U+FFFD (see _clean).
PLACEHOLDER_BASE = 0xF0000
PLACEHOLDER = re.compile("([\U000F0000-\U000FFFFD])")
SENTINEL_BASE = 0x100000
PREFIX_ERROR = ("the tokenizer's chat template renders the prompt differently with and without the answer; "
                "completion-only labels need a template whose generation prompt is a prefix of the full conversation")
_PROBE = "\n probe text \n"

Messages = Sequence[dict]


@dataclass
class EncodedChat:
    """A conversation's ids: the prompt (exactly what generation sees) then the completion (the answer and what the
    template adds after it, end-of-turn included; empty when encoding a prompt alone)."""

    prompt_ids: list[int]
    completion_ids: list[int]


@dataclass
class _Rendered:
    """A rendering as (template text, message index) pieces: text is template text where index is None."""

    pieces: list[tuple[str, int | None]]


class ChatEncoder:
    """Renders and encodes conversations for one tokenizer (`chat_encoder(tokenizer)` keeps one per tokenizer).

    Raises InputError when the tokenizer is not a fast (Rust) tokenizer or its template refuses a conversation.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise InputError(f"tokenizer {type(tokenizer).__name__} is not a fast (Rust `tokenizers`) tokenizer; "
                             "multitune needs one to keep pasted control strings as text")
        spec = json.loads(backend.to_str())
        template = tokenizer.chat_template or ""
        # Markers: special added tokens, and added tokens the template spells out (e.g. a non-special <|im_start|>).
        markers = [t for t in spec["added_tokens"] if t["special"] or t["content"] in template]
        self.markers = {t["content"]: t["id"] for t in markers}
        self._marker_pattern = re.compile("|".join(re.escape(m) for m in sorted(self.markers, key=len, reverse=True)))
        self._sentinel = {m["content"]: chr(SENTINEL_BASE + k) for k, m in enumerate(markers)}
        self._backend, self._sentinel_ids = _sentinel_tokenizer(spec, markers)
        self._sentinel_range = re.compile(f"[{chr(SENTINEL_BASE)}-{chr(SENTINEL_BASE + max(len(markers), 1))}]")
        self._marked: dict[str, str] = {}
        self.fold_system = self._probe_system_role()
        self._strip = self._probe_strips_content()
        self.end_of_turn = self._probe_end_of_turn()

    # --- public -------------------------------------------------------------------------------------------------

    def encode_prompts(self, conversations: Sequence[Messages]) -> list[list[int]]:
        """Prompt ids (generation prompt appended) per conversation, as prep encodes the same conversation."""
        rendered = self._render(conversations, add_generation_prompt=True)
        return self._encode([self._build(r, c)[0] for r, c in zip(rendered, conversations)])

    def encode_examples(self, conversations: Sequence[Messages], answers: Sequence[str]) -> list[EncodedChat]:
        """Prompt and completion ids per (conversation, answer). Prompt and completion are encoded separately so
        the prompt ids equal what `encode_prompts` gives. Raises InputError (PREFIX_ERROR) for a template whose
        generation prompt is not a prefix of the rendered conversation."""
        prompts, completions = self._split(conversations, answers)
        prompt_ids = self._encode([self._build(p, c)[0] for p, c in zip(prompts, conversations)])
        completion_ids = self._encode([self._build(p, [*c, {"role": "assistant", "content": a}])[0]
                                       for p, c, a in zip(completions, conversations, answers)])
        return [EncodedChat(p, c) for p, c in zip(prompt_ids, completion_ids)]

    def encode_truncated(self, messages: Messages, answer: str, max_length: int) -> tuple[EncodedChat, int] | None:
        """The example cut to `max_length` tokens by removing tokens from the end of its user text (the last user
        message first, then earlier ones); system prompt, template markers and the answer with its end-of-turn are
        kept whole. Returns (encoded, prompt tokens removed), or None when the answer alone does not fit."""
        (prompt,), (completion,) = self._split([messages], [answer])
        completion_ids = self._encode([self._build(completion, [*messages, {"role": "assistant",
                                                                              "content": answer}])[0]])[0]
        contents = [self._clean(str(m.get("content") or "")) for m in messages]
        original = None
        for _ in range(8):  # each pass re-encodes the cut text; merges at the cut can shift the count by a token
            text, spans = self._build(prompt, [{**m, "content": c} for m, c in zip(messages, contents)])
            encoding = self._backend.encode(text, add_special_tokens=False)
            ids = self._real_ids(encoding.ids)
            original = original if original is not None else len(ids)
            excess = len(ids) + len(completion_ids) - max_length
            if excess <= 0:
                return EncodedChat(ids, completion_ids), original - len(ids)
            users = [i for i, m in enumerate(messages) if m.get("role") == "user" and contents[i] and i in spans]
            if not users:
                return None
            index = users[-1]
            start, _ = spans[index]
            inside = [s - start for s, _ in encoding.offsets if spans[index][0] <= s < spans[index][1]]
            contents[index] = contents[index][:inside[-excess]] if len(inside) > excess else ""
        return None

    # --- rendering ----------------------------------------------------------------------------------------------

    def _render(self, conversations: Sequence[Messages], add_generation_prompt: bool) -> list[_Rendered]:
        """Each conversation rendered with placeholders for contents, split into template text and content slots."""
        if not conversations:
            return []
        texts = self._apply([self._placeholders(c) for c in conversations], add_generation_prompt)
        return [self._pieces(text) for text in texts]

    def _split(self, conversations, answers) -> tuple[list[_Rendered], list[_Rendered]]:
        prompts = self._render(conversations, add_generation_prompt=True)
        fulls = self._render([[*c, {"role": "assistant", "content": a}] for c, a in zip(conversations, answers)],
                             add_generation_prompt=False)
        completions = []
        for prompt, full in zip(prompts, fulls):
            whole = max(len(prompt.pieces) - 1, 0)  # pieces that must be equal; the last may be cut short
            if full.pieces[:whole] != prompt.pieces[:whole] or not _starts(full, prompt):
                raise InputError(PREFIX_ERROR)
            completions.append(_Rendered(_rest(full, prompt)))
        return prompts, completions

    def _placeholders(self, messages: Messages) -> list[dict]:
        """Messages with each content replaced by its placeholder; a system prompt folded into the first user
        turn for templates without a system role (what Gemma's and Mistral's authors recommend)."""
        out = [{**m, "content": chr(PLACEHOLDER_BASE + i)} for i, m in enumerate(messages)]
        if not self.fold_system:
            return out
        system = "\n\n".join(m["content"] for m in out if m["role"] == "system")
        out = [m for m in out if m["role"] != "system"]
        if system:
            first = next((m for m in out if m["role"] == "user"), None)
            if first is None:
                out.insert(0, {"role": "user", "content": system})
            else:
                first["content"] = f"{system}\n\n{first['content']}"
        return out

    def _apply(self, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(conversations, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        except TemplateError as exc:
            raise InputError(f"the tokenizer's chat template refused a conversation: {exc}") from None

    @staticmethod
    def _pieces(text: str) -> _Rendered:
        parts = PLACEHOLDER.split(text)
        pieces = []
        for k, part in enumerate(parts):
            if k % 2:
                pieces.append(("", ord(part) - PLACEHOLDER_BASE))
            elif part:
                pieces.append((part, None))
        return _Rendered(pieces)

    # --- encoding -----------------------------------------------------------------------------------------------

    def _build(self, rendered: _Rendered, messages: Messages) -> tuple[str, dict[int, tuple[int, int]]]:
        """The string to encode: template text with markers as sentinels, contents verbatim; and each message's
        character span in it."""
        out, spans, length = [], {}, 0
        for text, index in rendered.pieces:
            if index is None:
                piece = self._marked.get(text)
                if piece is None:
                    piece = self._marked[text] = self._marker_pattern.sub(lambda m: self._sentinel[m.group()], text) \
                        if self.markers else text
            else:
                piece = self._clean(str(messages[index].get("content") or ""))
                spans[index] = (length, length + len(piece))
            out.append(piece)
            length += len(piece)
        return "".join(out), spans

    def _clean(self, content: str) -> str:
        content = content.strip() if self._strip else content
        return self._sentinel_range.sub("\ufffd", content)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [self._real_ids(e.ids) for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]

    def _real_ids(self, ids: list[int]) -> list[int]:
        table = self._sentinel_ids
        return [table.get(i, i) for i in ids] if table else ids

    # --- what the template does -----------------------------------------------------------------------------------

    def _probe_system_role(self) -> bool:
        """True when the template refuses a system message but renders a user one: fold the system prompt."""
        from jinja2 import TemplateError

        user = [{"role": "user", "content": "x"}]
        try:
            self.tokenizer.apply_chat_template([{"role": "system", "content": "s"}, *user], tokenize=False)
            return False
        except TemplateError:
            pass
        try:
            self.tokenizer.apply_chat_template(user, tokenize=False)
        except TemplateError as exc:
            raise InputError(f"the tokenizer's chat template cannot render a single user message: {exc}") from None
        return True

    def _probe_strips_content(self) -> bool:
        """Whether the template trims message contents (Llama 3 and Gemma templates do)."""
        messages = [{"role": "user", "content": _PROBE}, {"role": "assistant", "content": _PROBE}]
        real = self._apply([messages], add_generation_prompt=False)[0]
        pieces = self._render([messages], add_generation_prompt=False)[0].pieces
        stripped = "".join(_PROBE.strip() if index is not None else text for text, index in pieces)
        return real == stripped and real != "".join(_PROBE if index is not None else text for text, index in pieces)

    def _probe_end_of_turn(self) -> int | None:
        """The first control token the template writes after an answer (None when it writes none)."""
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        pieces = self._render([messages], add_generation_prompt=False)[0].pieces
        after = [k for k, (_, index) in enumerate(pieces) if index == 1]
        if not after or not self.markers:
            return None
        tail = "".join(text for text, index in pieces[after[-1] + 1:] if index is None)
        match = self._marker_pattern.search(tail)
        return self.markers[match.group()] if match else None


def _sentinel_tokenizer(spec: dict, markers: list[dict]):
    """A copy of the Rust tokenizer in which each marker is spelt as its sentinel character, and the ids to map
    back to the markers' ids after encoding (empty in the usual case, where the sentinels keep the markers' ids).

    A marker in the model's vocabulary is renamed there; one outside it (the usual <|im_start|>) is re-added in the
    same order, which gives it the same id. Where that does not hold (checked), the markers are dropped, the
    sentinels get new ids and encoding maps them back (per token, slower).
    """
    from tokenizers import Tokenizer

    sentinels = {m["content"]: chr(SENTINEL_BASE + k) for k, m in enumerate(markers)}
    renamed = json.loads(json.dumps(spec))
    vocab = renamed["model"].get("vocab")
    if isinstance(vocab, dict):
        for content, sentinel in sentinels.items():
            if content in vocab:
                vocab[sentinel] = vocab.pop(content)
    elif isinstance(vocab, list):  # Unigram: [piece, score] pairs
        for pair in vocab:
            if pair[0] in sentinels:
                pair[0] = sentinels[pair[0]]
    renamed["added_tokens"] = [{**t, "content": sentinels[t["content"]], "special": True}
                               if t["content"] in sentinels else t for t in renamed["added_tokens"]]
    try:
        tokenizer = Tokenizer.from_str(json.dumps(renamed))
        if all(tokenizer.token_to_id(sentinels[m["content"]]) == m["id"] for m in markers):
            return tokenizer, {}
    except Exception:  # noqa: BLE001 - a model that does not load renamed: the mapped copy below always does
        pass
    mapped = {**spec, "added_tokens": [t for t in spec["added_tokens"] if t["content"] not in sentinels]
              + [{**m, "content": sentinels[m["content"]], "special": True} for m in markers]}
    tokenizer = Tokenizer.from_str(json.dumps(mapped))
    return tokenizer, {tokenizer.token_to_id(sentinels[m["content"]]): m["id"] for m in markers}


def _starts(full: _Rendered, prompt: _Rendered) -> bool:
    """Whether `prompt`'s pieces are a prefix of `full`'s (the last prompt piece may be cut short)."""
    n = len(prompt.pieces)
    if n == 0:
        return True
    if len(full.pieces) < n:
        return False
    last_text, last_index = prompt.pieces[-1]
    text, index = full.pieces[n - 1]
    return index == last_index and text.startswith(last_text)


def _rest(full: _Rendered, prompt: _Rendered) -> list[tuple[str, int | None]]:
    """The pieces of `full` after `prompt`."""
    n = len(prompt.pieces)
    if n == 0:
        return list(full.pieces)
    text, index = full.pieces[n - 1]
    rest = text[len(prompt.pieces[-1][0]):] if index is None else ""
    return ([(rest, None)] if rest else []) + list(full.pieces[n:])


_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def chat_encoder(tokenizer) -> ChatEncoder:
    """The encoder of `tokenizer`, built once (copying the Rust tokenizer costs ~0.2 s for a 32k vocabulary) and
    rebuilt when its chat template changes."""
    cached = _ENCODERS.get(tokenizer)
    if cached is None or cached[0] != tokenizer.chat_template:
        cached = _ENCODERS[tokenizer] = (tokenizer.chat_template, ChatEncoder(tokenizer))
    return cached[1]


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Token ids that end a generated answer: the template's end-of-turn, the generation config's eos (one id or a
    list) and the tokenizer's eos. One rule for eval, infer and serve."""
    ids = {chat_encoder(tokenizer).end_of_turn, tokenizer.eos_token_id}
    configured = getattr(generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)
