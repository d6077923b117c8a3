"""`multitune serve`: one model (+ optional adapter) behind an OpenAI-compatible chat-completions HTTP API."""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from multitune.data_prep.chat_encoding import chat_encoder, stop_token_ids
from multitune.recipes.errors import InputError


class RequestError(Exception):
    """A client mistake, answered with an OpenAI-style error object."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int


class ChatModel:
    """The model loaded once; `complete` runs one request at a time (one model, one lock). `system_prompt`: the
    system message an adapter was trained with, put first in requests that bring none (as Ollama's SYSTEM does), so
    a client sending only the user turn gets the prompt training saw."""

    def __init__(self, model, tokenizer, name: str, device: torch.device, system_prompt: str | None = None):
        self.model, self.tokenizer, self.name, self.device = model.eval(), tokenizer, name, device
        self.system_prompt = system_prompt
        self.lock = threading.Lock()
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config)

    def complete(self, messages: list[dict], max_tokens: int, temperature: float, top_p: float,
                 stop: list[str], seed: int | None) -> Completion:
        with self.lock:  # one generation at a time; the Rust tokenizer is not safe to share across threads either
            return self._complete(messages, max_tokens, temperature, top_p, stop, seed)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The request's prompt as token ids, with the trained system prompt first when the request has none."""
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        try:
            return chat_encoder(self.tokenizer).encode_prompts([messages])[0]
        except InputError as exc:  # the template refuses these messages (e.g. roles that do not alternate)
            raise RequestError(str(exc), param="messages") from None

    @torch.no_grad()
    def _complete(self, messages, max_tokens, temperature, top_p, stop, seed) -> Completion:
        prompt = self.prompt_ids(messages)
        if self.context and len(prompt) + max_tokens > self.context:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                               f"context of {self.context} tokens", param="messages")
        ids = torch.tensor([prompt], device=self.device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if seed is not None:
            torch.manual_seed(seed)
        generated = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=max_tokens, eos_token_id=self.stop_ids,
                                        pad_token_id=self.tokenizer.pad_token_id, use_cache=True, **sampling)
        new = generated[0, len(prompt):].tolist()
        ended = bool(new) and new[-1] in self.stop_ids
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            text, ended = text[:cut], True
        return Completion(text, "stop" if ended else "length", len(prompt), len(new))


def parse_request(body: bytes, served_name: str) -> dict:
    """Validated generation arguments from a chat-completions request body; RequestError names the bad field."""
    try:
        request = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON ({exc})") from None
    if not isinstance(request, dict):
        raise RequestError("request body must be a JSON object")
    model = request.get("model")
    if model is not None and model != served_name:
        raise RequestError(f"model '{model}' is not served here (this server serves '{served_name}')",
                           param="model", status=404, kind="model_not_found")
    if request.get("stream"):
        raise RequestError("stream=true is not supported", param="stream")
    if request.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", param="n")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts",
                               param=f"messages[{i}].content")
        clean.append({"role": message["role"], "content": content})
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens", 256))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise RequestError("'max_tokens' must be a positive integer", param="max_tokens")
    temperature, top_p = request.get("temperature", 1.0), request.get("top_p", 1.0)
    for name, value, high in (("temperature", temperature, 2.0), ("top_p", top_p, 1.0)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= high:
            raise RequestError(f"'{name}' must be a number in [0, {high}]", param=name)
    stop = request.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    seed = request.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RequestError("'seed' must be an integer", param="seed")
    return {"messages": clean, "max_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p),
            "stop": stop, "seed": seed}


def completion_response(completion: Completion, name: str) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                     "finish_reason": completion.finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                  "total_tokens": completion.prompt_tokens + completion.completion_tokens},
    }


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def make_handler(chat: ChatModel):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            path = self.path.split("?")[0].rstrip("/")
            if path in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [
                    {"id": chat.name, "object": "model", "created": 0, "owned_by": "multitune"}]})
            elif path == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._send(404, error_body(f"no route GET {path}", "not_found"))

        def do_POST(self):
            path = self.path.split("?")[0].rstrip("/")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if path not in ("/v1/chat/completions", "/chat/completions"):
                self._send(404, error_body(f"no route POST {path}", "not_found"))
                return
            try:
                completion = chat.complete(**parse_request(body, chat.name))
            except RequestError as exc:
                self._send(exc.status, error_body(str(exc), exc.kind, exc.param))
            except Exception as exc:  # a failed generation must answer the client, not kill the server
                self._send(500, error_body(f"{type(exc).__name__}: {exc}", "server_error"))
            else:
                self._send(200, completion_response(completion, chat.name))

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):  # one short line per request, on stderr
            print(f"{self.address_string()} {fmt % args}", file=sys.stderr, flush=True)

    return Handler


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


def serve(chat: ChatModel, host: str, port: int) -> None:
    """Serve until interrupted; prints the bound address (port 0 picks a free one) once requests are accepted."""
    server = ThreadingHTTPServer((host, port), make_handler(chat))
    server.daemon_threads = True
    print(f"serving {chat.name} on http://{host}:{server.server_port}/v1", flush=True)
    if chat.system_prompt:
        print(f"requests without a system message get the adapter's trained one ({len(chat.system_prompt)} "
              "characters, from multitune.json)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
