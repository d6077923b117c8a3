"""One model (+ optional adapter) loaded for chat: prompt encoding, and generation token by token with the stop rules,
stop strings, cancellation and a deadline (what `multitune serve` runs)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from multitune.data_prep.chat_encoding import chat_encoder, stop_token_ids
from multitune.recipes.errors import InputError


class RequestError(Exception):
    """A client mistake, answered with an OpenAI-style error object (`status`, `kind` = the error's `type`)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


@dataclass(frozen=True)
class Sampling:
    """How one request generates: `max_tokens` new tokens at most, temperature 0 = greedy, `stop` strings end the
    answer before them, `seed` makes sampling reproducible."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Completion:
    text: str
    # "stop" (end of turn, eos or a stop string), "length" (max_tokens reached), "cancelled" (the caller's cancel
    # event was set, e.g. the client went away) or "timeout" (the deadline passed); the last two are not OpenAI
    # finish reasons: the server turns them into errors or drops them.
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class _Halt(StoppingCriteria):
    """Ends generation at the next token once `should_stop()` is true (cancel, deadline, a stop string seen)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


class _TokenStreamer(BaseStreamer):
    """transformers' streamer hook, handing each new token id to `on_token` as `generate` makes it. Not
    TextIteratorStreamer: that one yields text only (usage and finish_reason need the ids) and holds text back
    until a space, while stop strings and the same-text-as-non-streaming rule need the decode of all ids so far."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.on_token(token)

    def end(self) -> None:
        pass


class ChatModel:
    """The model loaded once. `generate` runs one request at a time (one model, one lock) and reports text as it is
    final. `system_prompt`: the system message an adapter was trained with, put first in requests that bring none
    (as Ollama's SYSTEM does), so a client sending only the user turn gets the prompt training saw."""

    def __init__(self, model, tokenizer, name: str, device: torch.device, system_prompt: str | None = None):
        self.model, self.tokenizer, self.name, self.device = model.eval(), tokenizer, name, device
        self.system_prompt = system_prompt
        self.lock = threading.Lock()  # one generation at a time
        self.tokenizer_lock = threading.Lock()  # encodes (request threads) and decodes (generation) never overlap
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config)

    def prompt_ids(self, messages: list[dict], max_tokens: int | None = None) -> list[int]:
        """The request's prompt as token ids, with the trained system prompt first when the request has none.
        RequestError (param `messages`) when the template refuses the messages or prompt + `max_tokens` exceeds
        the model's context."""
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        try:
            with self.tokenizer_lock:
                prompt = chat_encoder(self.tokenizer).encode_prompts([messages])[0]
        except InputError as exc:  # the template refuses these messages (e.g. roles that do not alternate)
            raise RequestError(str(exc), param="messages") from None
        if max_tokens is not None and self.context and len(prompt) + max_tokens > self.context:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                               f"context of {self.context} tokens", param="messages")
        return prompt

    def complete(self, messages: list[dict], max_tokens: int, temperature: float, top_p: float,
                 stop: list[str], seed: int | None) -> Completion:
        """The whole answer to `messages` at once (no streaming, no cancel)."""
        return self.generate(self.prompt_ids(messages, max_tokens),
                             Sampling(max_tokens, temperature, top_p, tuple(stop), seed))

    @torch.no_grad()
    def generate(self, prompt: list[int], sampling: Sampling, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None, deadline: float | None = None) -> Completion:
        """Generate after `prompt` (token ids). `on_text(delta)` gets each piece of the answer as soon as it is
        final: the pieces join to exactly `Completion.text`, the decode of all new tokens (special tokens skipped)
        cut before the first stop string; text that may still turn out to start a stop string, or is half a
        multi-byte character, is held back. Generation ends at a stop token, a stop string, `max_tokens`,
        `cancel` being set or `deadline` (time.monotonic()) passing: finish_reason stop, length, cancelled,
        timeout. Errors from the model propagate."""
        with self.lock:
            return self._generate(prompt, sampling, on_text or (lambda text: None), cancel or threading.Event(),
                                  deadline)

    def _generate(self, prompt, sampling: Sampling, on_text, cancel: threading.Event, deadline) -> Completion:
        new: list[int] = []
        sent = ""  # text already handed to on_text
        stopped_by_string = False
        hold = max((len(s) for s in sampling.stop), default=1) - 1

        def decoded() -> tuple[str, bool]:
            with self.tokenizer_lock:
                text = self.tokenizer.decode(new, skip_special_tokens=True)
            cut = min((text.find(s) for s in sampling.stop if s in text), default=-1)
            return (text[:cut], True) if cut >= 0 else (text, False)

        def on_token(token: int) -> None:
            nonlocal sent, stopped_by_string
            new.append(token)
            text, stopped_by_string = decoded()
            ready = text if stopped_by_string else text[:len(text) - hold]
            ready = ready.rstrip("\ufffd")  # half of a multi-byte character: wait for the rest
            if len(ready) > len(sent) and ready.startswith(sent):
                on_text(ready[len(sent):])
                sent = ready

        def should_stop() -> bool:
            return stopped_by_string or cancel.is_set() or (deadline is not None and time.monotonic() > deadline)

        if not should_stop():  # a request cancelled or out of time while it waited is not started
            ids = torch.tensor([prompt], device=self.device)
            sampling_args = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p} \
                if sampling.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=sampling.max_tokens,
                                eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
                                streamer=_TokenStreamer(on_token), stopping_criteria=StoppingCriteriaList(
                                    [_Halt(should_stop)]), **sampling_args)
        text, stopped_by_string = decoded()
        if text.startswith(sent) and len(text) > len(sent):
            on_text(text[len(sent):])
        if stopped_by_string or (new and new[-1] in self.stop_ids):
            reason = "stop"
        elif len(new) >= sampling.max_tokens:
            reason = "length"
        elif cancel.is_set():
            reason = "cancelled"
        else:
            reason = "timeout"
        return Completion(text, reason, len(prompt), len(new))


def load_chat_model(model_path: str | None, adapter: Path | None, dtype: str, name: str | None,
                    quantization: str | None = None) -> ChatModel:
    """The base model (dtype as given; NF4 when asked, and by default when the adapter was trained on an NF4 base, as
    QLoRA adapters are), with the adapter applied when one is given; tokenizer from the adapter folder when it
    carries one (the one it was trained with). Without `model_path`, the base the adapter recorded. InputError when
    the base is missing or is not the adapter's."""
    from peft import PeftModel

    from multitune.recipes.schema import AdapterConfig, ModelConfig
    from multitune.trainer.adapter_base import check_base
    from multitune.trainer.merge import adapter_info
    from multitune.trainer.model import check_adapter_folder, load_model, load_tokenizer

    if adapter is None and model_path is None:
        raise InputError("multitune serve: give the base MODEL, an --adapter, or both")
    if adapter is not None:
        check_adapter_folder(adapter)
        info = adapter_info(adapter)  # multitune.json: base, quantization, the trained system prompt
        model_path = model_path or info["base_model"]
        check_base(adapter, model_path, "the MODEL argument (`multitune serve NEW/BASE --adapter ...`)")
        quantization = quantization or info["quantization"]  # what the adapter was trained against
    quantization = quantization or "none"
    config = ModelConfig(name_or_path=model_path, dtype=dtype, compute_dtype=dtype, quantization=quantization)
    has_tokenizer = adapter is not None and (adapter / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(config.model_copy(update={"name_or_path": str(adapter)}) if has_tokenizer else config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(config, AdapterConfig(kind="none"), device, gradient_checkpointing=False)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    if name is None:  # runs/<name>/adapter → "<name>"
        name = (adapter.resolve().parent.name if adapter.name == "adapter" else adapter.name) if adapter \
            else Path(model_path).name or model_path
    system_prompt = info.get("system_prompt") if adapter is not None else None
    print(f"base {model_path} ({'NF4 4-bit' if quantization == 'nf4' else dtype})"
          + (f" + adapter {adapter}" if adapter is not None else ""), flush=True)
    return ChatModel(model, tokenizer, name, device, system_prompt)
