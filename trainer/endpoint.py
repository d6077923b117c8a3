"""Chat completions from any OpenAI-compatible endpoint (hosted or `multitune serve`): timeouts, bounded retries,
replies checked, and every failure turned into one InputError line naming the endpoint."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai

from multitune.recipes.errors import InputError

DEFAULT_KEY_ENV = "OPENAI_API_KEY"


@dataclass(frozen=True)
class EndpointSpec:
    """Where to send requests. The key is read from the environment variable `api_key_env`, never stored."""

    base_url: str
    model: str
    api_key_env: str | None = None  # None: $OPENAI_API_KEY when set, else no key (self-served models need none)
    timeout_s: float = 60.0
    max_retries: int = 2
    concurrency: int = 4


class EndpointClient:
    def __init__(self, spec: EndpointSpec):
        key = os.environ.get(spec.api_key_env or DEFAULT_KEY_ENV)
        if not key and spec.api_key_env:
            raise InputError(f"api key: environment variable {spec.api_key_env} is not set")
        if not spec.base_url.startswith(("http://", "https://")):
            raise InputError(f"endpoint {spec.base_url!r}: expected an http(s):// base URL such as "
                             "http://127.0.0.1:8000/v1")
        self.spec = spec
        # A self-served model needs no key; the client insists on a non-empty one.
        self.client = openai.OpenAI(base_url=spec.base_url, api_key=key or "no-key", timeout=spec.timeout_s,
                                    max_retries=spec.max_retries)

    def chat(self, messages: list[dict], max_tokens: int, temperature: float = 0.0) -> str:
        """The reply text of one chat completion (greedy by default)."""
        where = f"endpoint {self.spec.base_url} (model {self.spec.model})"
        try:
            reply = self.client.chat.completions.create(model=self.spec.model, messages=messages,
                                                        max_tokens=max_tokens, temperature=temperature)
        except openai.APITimeoutError:
            raise InputError(f"{where}: no reply within {self.spec.timeout_s:g} s "
                             f"({self.spec.max_retries} retries)") from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            raise InputError(f"{where}: cannot connect ({cause}) after {self.spec.max_retries} retries") from None
        except openai.APIStatusError as exc:
            raise InputError(f"{where}: HTTP {exc.status_code}: {_error_message(exc)}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{where}: the reply is not JSON ({exc})") from None
        # The client does not validate replies: garbage shapes arrive as attributes set to None or as plain strings.
        choices = getattr(reply, "choices", None)
        message = getattr(choices[0], "message", None) if isinstance(choices, list) and choices else None
        content = getattr(message, "content", None)
        if content is None and message is not None and getattr(message, "refusal", None):
            return ""
        if not isinstance(content, str):
            raise InputError(f"{where}: the reply is not a chat completion (no choices[0].message.content string): "
                             f"{str(reply)[:120]!r}")
        return content

    def chat_many(self, conversations: list[list[dict]], max_tokens: int, temperature: float = 0.0) -> list[str]:
        """Replies in input order; `concurrency` requests in flight (a lone local server handles them in turn)."""
        pool = ThreadPoolExecutor(max_workers=self.spec.concurrency)
        futures = [pool.submit(self.chat, m, max_tokens, temperature) for m in conversations]
        try:
            return [future.result() for future in futures]
        finally:  # on the first failure, drop the queued requests instead of failing each in turn
            pool.shutdown(wait=True, cancel_futures=True)


def _error_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])[:200]
    return (exc.response.text or exc.message)[:200].replace("\n", " ")
