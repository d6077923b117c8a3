"""`multitune serve` as a real subprocess driven by the openai client and by `multitune eval --endpoint`; endpoint
failures (down, garbage) give one clear line quickly; the judge's score parser and its end-to-end plumbing."""

from __future__ import annotations

import json
import selectors
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from conftest import REPO, recipe_dict, write_recipe

SERVED = "tiny"
MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is DNS?"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """Base URL of a `multitune serve` subprocess on a free port; always terminated."""
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "multitune", "serve", str(tiny_model_dir), "--port", "0",
                                 "--served-name", SERVED], cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        url = _wait_for_address(proc, deadline=time.monotonic() + 180, log=log)
        for _ in range(50):  # bounded readiness loop on /health
            try:
                with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=2) as reply:
                    if json.load(reply) == {"status": "ok"}:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("server printed its address but /health never answered")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


def _client(url: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60, **kwargs)


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
        request = urllib.request.Request(server + "/chat/completions", data=body, method="POST")
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
    with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
        _client(server).chat.completions.create(model="gpt-x", messages=MESSAGES, max_tokens=2)


def _recipe(tmp_path, model_dir):
    return write_recipe(tmp_path / "recipe.yaml", recipe_dict(
        tmp_path, model_dir, task="medical_qa", data={"generator": {"n_train": 8, "n_eval": 3, "seed": 2}},
        eval={"max_samples": 3, "max_new_tokens": 8, "batch_size": 1}))


def test_eval_endpoint_column_matches_base_and_judge_scores_every_column(server, tiny_model_dir, tmp_path,
                                                                         monkeypatch, capsys):
    from multitune.launch.cli import main

    monkeypatch.setenv("MT_TEST_KEY", "sk-test-secret-4711")
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
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
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
