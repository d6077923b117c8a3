"""`multitune serve` as a real subprocess driven by the openai client and by `multitune eval --endpoint`; endpoint
failures (down, garbage) give one clear line quickly; the judge's score parser and its end-to-end plumbing."""

from __future__ import annotations

import json
import os
import re
import selectors
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import torch
from conftest import REPO, recipe_dict, write_recipe

SERVED = "tiny"
MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is DNS?"}]


KEY = "sk-test-secret-4711"  # the served key; the eval test sends it through --api-key-env
BODY_LIMIT = 65536


@dataclass
class Served:
    url: str
    log: Path  # the server's stderr

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()


def start_server(model_dir: Path, log: Path, *flags: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """A `multitune serve` subprocess on a free loopback port, its base URL once /health answers."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "multitune", "serve", str(model_dir), "--port", "0",
                                 "--served-name", SERVED, *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=err,
                                text=True, env={**os.environ, **(env or {})})
    try:
        url = _wait_for_address(proc, deadline=time.monotonic() + 180, log=log)
        for _ in range(50):  # bounded readiness loop on /health (open without the key)
            try:
                with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=2) as reply:
                    if json.load(reply) == {"status": "ok"}:
                        return proc, url
            except OSError:
                time.sleep(0.1)
        pytest.fail("server printed its address but /health never answered")
    except BaseException:
        stop_server(proc)
        raise


def _wait_for_address(proc: subprocess.Popen, deadline: float, log) -> str:
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if selector.select(timeout=0.5):
            line = proc.stdout.readline()
            if line.startswith("serving "):
                return line.split(" on ")[1].strip()
    pytest.fail("serve did not print its address in time")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """`multitune serve` with an API key (from the variable --api-key-env names) and a 64 KiB body limit."""
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    proc, url = start_server(tiny_model_dir, log, "--api-key-env", "MT_SERVE_KEY", "--max-body-bytes",
                             str(BODY_LIMIT), "--max-tokens", "3000", env={"MT_SERVE_KEY": KEY})
    try:
        yield Served(url, log)
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def server(served) -> str:
    return served.url


def _client(url: str, api_key: str = KEY, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=60, **kwargs)


def test_openai_client_gets_chat_completions_with_usage(server, tokenizer):
    client = _client(server)
    assert [m.id for m in client.models.list()] == [SERVED]
    reply = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=6, temperature=0)
    again = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.role == "assistant"
    assert choice.message.content == again.choices[0].message.content  # greedy is deterministic
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert reply.usage.prompt_tokens == len(prompt)
    assert 1 <= reply.usage.completion_tokens <= 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert choice.finish_reason == ("length" if reply.usage.completion_tokens == 6 else "stop")

    text = choice.message.content
    if len(text) >= 3:  # a stop string cuts the reply before it and ends it with finish_reason "stop"
        stop = text[1:3]
        cut = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=6, temperature=0, stop=[stop])
        assert cut.choices[0].message.content == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"

    sampled = [client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=8, temperature=1.0,
                                              seed=seed).choices[0].message.content for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1]  # the seed makes sampling reproducible


def test_bad_requests_get_openai_style_errors(server):
    def post(body: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(server + "/chat/completions", data=body, method="POST",
                                         headers={"Authorization": f"Bearer {KEY}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, json.load(reply)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    status, body = post(b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(json.dumps({"model": SERVED}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = post(json.dumps({"messages": MESSAGES, "max_tokens": 0}).encode())
    assert status == 400 and body["error"]["param"] == "max_tokens"
    for wrong, param in (({"max_tokens": True}, "max_tokens"), ({"temperature": "0"}, "temperature"),
                         ({"n": 2}, "n"), ({"stop": [""]}, "stop"), ({"stream": "yes"}, "stream")):
        status, body = post(json.dumps({"messages": MESSAGES, **wrong}).encode())
        assert (status, body["error"]["param"], body["error"]["type"]) == (400, param, "invalid_request_error")
    image = [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                          {"type": "image_url", "image_url": {"url": "data:,"}}]}]
    status, body = post(json.dumps({"messages": image}).encode())
    assert status == 400 and body["error"]["message"] == "messages[0].content: only text parts are supported"
    with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
        _client(server).chat.completions.create(model="gpt-x", messages=MESSAGES, max_tokens=2)
    reply = httpx.get(server + "/nowhere", headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 404 and reply.json()["error"]["message"] == "Not Found: GET /v1/nowhere"


def _stream(client: openai.OpenAI, **kwargs) -> tuple[list[str], str | None, object, str]:
    """The content pieces, finish_reason, usage and id of a streamed completion of MESSAGES."""
    pieces, finish, usage, chunk_id = [], None, None, None
    for chunk in client.chat.completions.create(model=SERVED, messages=MESSAGES, stream=True,
                                                stream_options={"include_usage": True}, **kwargs):
        usage, chunk_id = chunk.usage or usage, chunk.id
        for choice in chunk.choices:
            pieces += [choice.delta.content] if choice.delta.content else []
            finish = choice.finish_reason or finish
    return pieces, finish, usage, chunk_id


def test_streaming_gives_the_text_finish_reason_and_usage_of_non_streaming(served):
    client = _client(served.url)
    whole = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=40, temperature=0)
    text = whole.choices[0].message.content
    pieces, finish, usage, _ = _stream(client, max_tokens=40, temperature=0)
    assert "".join(pieces) == text and (finish, usage) == (whole.choices[0].finish_reason, whole.usage)
    assert len(pieces) >= whole.usage.completion_tokens // 2  # token by token, not the answer in one piece
    # a stop string spanning tokens: the streamed text holds back what may start it and ends exactly before it
    stop = text[len(text) // 2:len(text) // 2 + 4]
    cut = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=40, temperature=0, stop=stop)
    assert cut.choices[0].message.content == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    pieces, finish, usage, _ = _stream(client, max_tokens=40, temperature=0, stop=stop)
    assert ("".join(pieces), finish, usage) == (text[:text.find(stop)], "stop", cut.usage)
    # the wire format: `data: {chunk}` events, the role first, the finish_reason last, then [DONE]
    with httpx.stream("POST", served.url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": MESSAGES, "max_tokens": 5, "temperature": 0, "stream": True}) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        events = [line for line in reply.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert "usage" not in chunks[-1]  # only when stream_options.include_usage asks for it, as OpenAI does


def test_a_missing_or_wrong_key_gets_401_the_right_one_200_and_the_key_is_never_logged(served):
    for key in (KEY + "x", KEY[:-1], "k"):
        with pytest.raises(openai.AuthenticationError, match="incorrect API key") as refused:
            _client(served.url, api_key=key).chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=2)
        assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    body = {"messages": MESSAGES, "max_tokens": 2}
    for headers in ({}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer"}):
        reply = httpx.post(served.url + "/chat/completions", json=body, headers=headers)
        assert reply.status_code == 401 and reply.json()["error"]["type"] == "invalid_request_error"
        assert "missing API key" in reply.json()["error"]["message"]
    assert httpx.get(served.url + "/models").status_code == 401  # every /v1 route, not only generation
    assert httpx.get(served.url.removesuffix("/v1") + "/health").json() == {"status": "ok"}  # probes need no key
    reply = _client(served.url).chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=2)
    assert reply.choices[0].message.content is not None
    log = served.log.read_text()
    assert '"POST /v1/chat/completions" 401' in log and '"POST /v1/chat/completions" 200' in log
    assert "sk-test" not in log and "4711" not in log


def test_an_oversized_body_gets_413_before_the_server_reads_it(served):
    address = (urlsplit(served.url).hostname, urlsplit(served.url).port)

    def exchange(head: bytes, body: bytes) -> tuple[int, dict]:
        with socket.create_connection(address, timeout=20) as sock:
            sock.sendall(head + body)
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
        status = int(reply.split(b" ", 2)[1])
        return status, json.loads(reply.split(b"\r\n\r\n", 1)[1])

    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\n").encode()
    # 64 MB announced, 14 bytes sent: only an answer that does not wait for the body arrives at all
    status, reply = exchange(head + f"Content-Length: {1000 * BODY_LIMIT}\r\n\r\n".encode(), b'{"messages": [')
    assert status == 413 and f"limit of {BODY_LIMIT} bytes" in reply["error"]["message"]
    # no Content-Length (chunked): counted as it arrives, refused once past the limit
    chunk = b"x" * 16384
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(BODY_LIMIT // len(chunk) + 1))
    status, reply = exchange(head + b"Transfer-Encoding: chunked\r\n\r\n", chunks)
    assert status == 413 and "--max-body-bytes" in reply["error"]["message"]
    # the same key without a body limit problem is answered
    body = json.dumps({"messages": MESSAGES, "max_tokens": 2}).encode()
    status, reply = exchange(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode(), body)
    assert status == 200 and reply["object"] == "chat.completion"


def _generations(served: Served) -> dict[str, dict]:
    """The server's one line per generation, by request id: prompt/completion tokens, finish, queued seconds."""
    found = {}
    for index, line in enumerate(served.lines()):
        if line.startswith("chatcmpl-") and " finish=" in line:
            request_id, *fields = line.split()
            found[request_id] = {"line": index, **dict(f.split("=", 1) for f in fields if "=" in f)}
    return found


def test_a_client_that_goes_away_frees_the_model_for_the_next_request(served):
    client = _client(served.url)
    stream = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=3000, temperature=0,
                                            stream=True)
    pieces = 0
    for chunk in stream:
        pieces += bool(chunk.choices and chunk.choices[0].delta.content)
        if pieces == 3:
            break
    stream.close()  # mid-stream: 3000 tokens would take minutes here
    with pytest.raises(openai.APITimeoutError):  # a non-streaming client that gives up
        client.with_options(timeout=1.5).chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=3000,
                                                                 temperature=0)
    reply = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens == 4
    generations = _generations(served)
    streamed, answered = generations[chunk.id], generations[reply.id]
    assert streamed["finish"] == "cancelled" and int(streamed["completion"]) < 3000
    given_up = [g for g in generations.values() if streamed["line"] < g["line"] < answered["line"]]
    assert [g["finish"] for g in given_up] == ["cancelled"] and int(given_up[0]["completion"]) < 3000
    assert float(answered["queued"][:-1]) < 10


def test_requests_queue_in_arrival_order_and_health_answers_during_a_generation(served):
    client = _client(served.url)
    stream = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=400, temperature=0,
                                            stream=True)
    chunks = iter(stream)
    while not (chunk := next(chunks)).choices[0].delta.content:  # the first token: it is generating now
        pass
    with urllib.request.urlopen(served.url.removesuffix("/v1") + "/health", timeout=5) as reply:
        assert json.load(reply) == {"status": "ok"}
    answers = {}

    def ask(name: str) -> None:
        answers[name] = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=6, temperature=0)

    clients = []
    for name in ("b", "c"):  # two more clients, b first
        clients.append(threading.Thread(target=ask, args=(name,)))
        clients[-1].start()
        time.sleep(0.5)
    rest = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    for thread in clients:
        thread.join(timeout=120)
    assert len(rest) > 10
    b, c = answers["b"], answers["c"]  # both answered, the same greedy text
    assert b.choices[0].message.content == c.choices[0].message.content and b.usage.completion_tokens == 6
    generations, lines = _generations(served), served.lines()
    health = max(i for i, line in enumerate(lines) if '"GET /health" 200' in line)
    first, second, third = (generations[i] for i in (chunk.id, b.id, c.id))
    assert health < first["line"] < second["line"] < third["line"]  # health answered mid-generation; FIFO
    assert float(second["queued"][:-1]) > 0.5 and first["finish"] == "length"


def test_max_tokens_limit_timeout_and_full_queue(served, tiny_model_dir, tmp_path):
    with pytest.raises(openai.BadRequestError, match=r"limit of 3000 \(--max-tokens\)") as refused:
        _client(served.url).chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=3001)
    assert refused.value.param == "max_tokens"
    proc, url = start_server(tiny_model_dir, tmp_path / "stderr.log", "--timeout", "4", "--max-queue", "1")
    try:
        client = _client(url)  # this server has no key: the client's is ignored
        stream = iter(client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=3000, stream=True))
        while not next(stream).choices[0].delta.content:  # generating
            pass
        queued = {}
        waiter = threading.Thread(target=lambda: queued.update(error=_error_of(
            lambda: client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=3000))))
        waiter.start()
        time.sleep(0.5)
        with pytest.raises(openai.RateLimitError, match="1 requests are already waiting"):
            client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=2)
        with pytest.raises(openai.APIError, match=r"limit of 4 s \(--timeout\)"):  # mid-stream: an error event
            for _ in stream:
                pass
        waiter.join(timeout=60)
        assert isinstance(queued["error"], openai.InternalServerError) and queued["error"].status_code == 504
        assert "limit of 4 s" in queued["error"].message
        finished = [line for line in (tmp_path / "stderr.log").read_text().splitlines() if " finish=" in line]
        assert len(finished) == 2 and all("finish=timeout" in line for line in finished)
        assert int(finished[0].split("completion=")[1].split()[0]) < 3000
    finally:
        stop_server(proc)


def _error_of(call) -> Exception | None:
    try:
        call()
    except Exception as exc:
        return exc
    return None


def test_an_open_host_without_a_key_warns_in_one_line(tmp_path, capsys, monkeypatch):
    """Checked before the model loads (here: a model folder that is not there, so nothing binds)."""
    from multitune.launch.cli import main

    monkeypatch.delenv("MULTITUNE_API_KEY", raising=False)
    missing = str(tmp_path / "no-model")
    for host, extra, warned in (("0.0.0.0", [], True), ("::", [], True), ("10.1.2.3", [], True),
                                ("127.0.0.1", [], False), ("localhost", [], False), ("::1", [], False),
                                ("0.0.0.0", ["--api-key", "k"], False)):
        assert main(["serve", missing, "--host", host, *extra]) == 2
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert warnings == ([f"warning: serving on {host} without an API key: anyone who can reach this port can "
                             "use the model (set one with --api-key-env VAR)"] if warned else [])
    monkeypatch.setenv("MULTITUNE_API_KEY", "from-the-environment")
    assert main(["serve", missing, "--host", "0.0.0.0"]) == 2
    assert "warning:" not in capsys.readouterr().err


def test_a_trained_adapter_folder_is_what_vllm_lora_modules_loads(tiny_model_dir, tokenizer, tmp_path):
    """What docs/serving.md promises for `vllm serve BASE --enable-lora --lora-modules NAME=ADAPTER`: a PEFT LoRA
    config vLLM reads (explicit module names, no bias, DoRA or modules_to_save, the base named), safetensors
    tensors named `base_model.model.<module>.lora_{A,B}.weight` for Linear modules of the base with the shapes
    vLLM stacks, and the training tokenizer and chat template beside them, adding no tokens."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from multitune.launch.cli import main

    recipe = recipe_dict(tmp_path, tiny_model_dir, train={"max_steps": 2}, adapter={"r": 8, "alpha": 16})
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 8, 16)
    assert config["bias"] == "none" and not config["use_dora"] and not config["modules_to_save"]
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    # "all-linear" is written out as module paths; vLLM checks each by its last part against the modules it can
    # put LoRA on (a string such as "all-linear" would be read letter by letter)
    assert isinstance(config["target_modules"], list)
    targets = {t.rsplit(".", 1)[-1] for t in config["target_modules"]}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert json.loads((adapter / "multitune.json").read_text())["base_model"] == str(tiny_model_dir)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])\.weight")
    assert not (adapter / "adapter_model.bin").exists()
    with safe_open(adapter / "adapter_model.safetensors", "pt") as weights:
        shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    halves: dict[str, set] = {}
    for key, shape in shapes.items():
        match = name.fullmatch(key)
        assert match, f"{key}: not a name vLLM's LoRA loader parses"
        module = base.get_submodule(match["module"])
        assert isinstance(module, torch.nn.Linear) and match["module"].rsplit(".", 1)[1] in targets
        assert shape == ((8, module.in_features) if match["half"] == "A" else (module.out_features, 8))
        halves.setdefault(match["module"], set()).add(match["half"])
    linear = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    assert sorted(halves) == sorted(linear) and all(h == {"A", "B"} for h in halves.values())

    beside = AutoTokenizer.from_pretrained(adapter)
    assert (adapter / "tokenizer.json").is_file() and (adapter / "chat_template.jinja").is_file()
    assert beside.chat_template == tokenizer.chat_template and len(beside) == len(tokenizer) <= base.config.vocab_size
    text = "Disk </s> full [INST] on srv-01 ✓"
    assert beside(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert beside.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == \
        tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)


def _recipe(tmp_path, model_dir):
    return write_recipe(tmp_path / "recipe.yaml", recipe_dict(
        tmp_path, model_dir, task="medical_qa", data={"generator": {"n_train": 8, "n_eval": 3, "seed": 2}},
        eval={"max_samples": 3, "max_new_tokens": 8, "batch_size": 1}))


def test_eval_endpoint_column_matches_base_and_judge_scores_every_column(server, tiny_model_dir, tmp_path,
                                                                         monkeypatch, capsys):
    from multitune.launch.cli import main

    monkeypatch.setenv("MT_TEST_KEY", KEY)
    recipe = _recipe(tmp_path, tiny_model_dir)
    assert main(["eval", str(recipe), "--endpoint", server, "--endpoint-model", SERVED, "--api-key-env",
                 "MT_TEST_KEY", "--judge-endpoint", server, "--judge-model", SERVED]) == 0
    eval_dir = tmp_path / "run" / "eval"
    rows = [line.split(",") for line in (eval_dir / "comparison.csv").read_text().splitlines()]
    table = {row[0]: row[1:] for row in rows}
    assert table["metric"] == ["base", SERVED]
    assert table["answer_nll"][1] == "-"  # needs the weights: empty for an endpoint
    base, served = (json.loads((eval_dir / f"{label}.json").read_text()) for label in ("base", SERVED))
    # Same weights, same prompt tokens, greedy: the served model answers exactly as the local base model does.
    assert [e["output"] for e in served["examples"]] == [e["output"] for e in base["examples"]]
    assert served["rougeL"] == base["rougeL"] and served["endpoint"] == server
    for result in (base, served):
        rate = result["judge_parse_rate"]
        scores = [e["judge"]["score"] for e in result["examples"]]
        assert rate == sum(s is not None for s in scores) / 3 and all(s in (None, 1, 2, 3, 4, 5) for s in scores)
        assert ("judge_score" in result) == (rate > 0)
        assert all(isinstance(e["judge"]["reply"], str) for e in result["examples"])
    assert "judge_parse_rate" in table
    assert "| judge_parse_rate" in capsys.readouterr().out
    assert not any(b"sk-test-secret" in f.read_bytes() for f in eval_dir.rglob("*") if f.is_file())  # never stored


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_server_down_is_one_clear_line_quickly(tiny_model_dir, tmp_path, capsys):
    from multitune.launch.cli import main

    recipe = _recipe(tmp_path, tiny_model_dir)
    started = time.monotonic()
    code = main(["eval", str(recipe), "--no-base", "--endpoint", f"http://127.0.0.1:{_free_port()}/v1",
                 "--endpoint-model", "m", "--endpoint-retries", "1", "--endpoint-timeout", "5"])
    lines = capsys.readouterr().err.strip().splitlines()
    (err,) = [line for line in lines if line.startswith("error: ")]  # one error line; nothing else but warnings
    assert code == 2 and all(line.startswith("warning: ") for line in lines if line != err)
    assert "cannot connect" in err and "Connection refused" in err and "after 1 retries" in err
    assert time.monotonic() - started < 60


class Garbage(BaseHTTPRequestHandler):
    """A broken 'OpenAI' server: the reply body and status are set by the test."""

    status, body, requests = 200, b"", 0

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).requests += 1
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def garbage_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status, body, message", [
    (200, b"<html>gateway says hi</html>", "the reply is not JSON"),
    (200, b'{"object": "list", "data": []}', "not a chat completion"),
    (200, b'{"choices": [{"message": {"content": 5}}]}', "not a chat completion"),
    (503, b"upstream overloaded", "HTTP 503: upstream overloaded"),
])
def test_garbage_replies_give_one_clear_error(garbage_server, status, body, message):
    from multitune.recipes.errors import InputError
    from multitune.trainer.endpoint import EndpointClient, EndpointSpec

    Garbage.status, Garbage.body, Garbage.requests = status, body, 0
    client = EndpointClient(EndpointSpec(garbage_server, "m", timeout_s=5, max_retries=1, concurrency=2))
    with pytest.raises(InputError, match=message) as caught:
        client.chat(MESSAGES, max_tokens=4)
    assert "\n" not in str(caught.value) and garbage_server in str(caught.value)
    assert Garbage.requests == (2 if status == 503 else 1)  # a 5xx is retried (bounded), a bad 200 reply is not
    with pytest.raises(InputError, match=message):
        client.chat_many([MESSAGES] * 4, max_tokens=4)


def test_endpoint_flags_are_checked_before_any_work(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from multitune.launch.cli import main

    recipe = str(_recipe(tmp_path, tiny_model_dir))
    monkeypatch.delenv("MT_UNSET_KEY", raising=False)
    assert main(["eval", recipe, "--endpoint", "http://127.0.0.1:1/v1"]) == 2
    assert "--endpoint and --endpoint-model go together" in capsys.readouterr().err
    assert main(["eval", recipe, "--endpoint", "http://x/v1", "--endpoint-model", "m",
                 "--api-key-env", "MT_UNSET_KEY"]) == 2
    assert "MT_UNSET_KEY is not set" in capsys.readouterr().err
    assert main(["eval", recipe, "--judge-endpoint", "localhost:8000", "--judge-model", "m"]) == 2
    assert "expected an http(s):// base URL" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("reply, score", [
    ('{"score": 4}', 4),
    ('Sure! {"score": "2", "reason": "misses the cause"}', 2),
    ("Score: 5/5 - identical to the reference.", 5),
    ("Comparing the 2 answers, I give a rating of 3.", 3),
    ("The candidate covers 3 of the 4 points. Score: 4", 4),
    ("4", 4),
    ("I would say 3 out of 5.", 3),
    ("Score: 10", None),
    ("It is 4.5 good", None),
    ('{"score": 7}', None),
    ("no idea", None),
    ("", None),
])
def test_judge_score_parser(reply, score):
    from multitune.trainer.judge import parse_score

    assert parse_score(reply) == score
