"""The OpenAI-compatible back end against a small server on 127.0.0.1 that fails now and then."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from delia.backends import SamplingParams, get_backend
from delia.backends.openai import OpenAIBackend
from delia.errors import DeliaError


class FakeServer:
    """Answers /v1/completions with a canned text naming the prompt and seed. `fail_every` makes every
    k-th request a 500, `slow_first` makes the first request outlast the client's timeout."""

    def __init__(self, fail_every: int = 0, slow_first: float = 0.0, status: int = 500, usage: bool = True):
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({**body, "path": self.path, "auth": self.headers.get("Authorization")})
                    count = len(server.requests)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                released = False

                def release():  # before the last bytes go out: once the client has them, it may send the next
                    nonlocal released
                    if not released:
                        released = True
                        with server.lock:
                            server.in_flight -= 1

                try:
                    time.sleep(slow_first if count == 1 else 0.01)
                    if fail_every and count % fail_every == 0:
                        self.send_response(status)
                        self.end_headers()
                        release()
                        self.wfile.write(b'{"error": "overloaded"}')
                        return
                    prompt = body["prompt"]
                    text = f"answer to {prompt if isinstance(prompt, str) else len(prompt)} seed {body['seed']}"
                    finish = "length" if body["max_tokens"] < 5 else "stop"
                    reply = {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}
                    if usage:
                        reply["usage"] = {"prompt_tokens": 99, "completion_tokens": 7}
                    data = json.dumps(reply).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    release()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up
                finally:
                    release()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(**kw):
        servers.append(FakeServer(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


PROMPTS = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11, 12], [13]]


def collect(backend, prompts, params, seeds=None):
    out: dict[int, list] = {}
    for i, c in backend.generate(prompts, params, seeds):
        out.setdefault(i, []).append(c)
    return out


def test_retries_server_errors_and_keeps_the_concurrency_limit(server_factory):
    server = server_factory(fail_every=3)
    backend = get_backend("openai", "served-name", base_url=server.url, concurrency=2, backoff=0.01,
                          api_key="k")
    out = collect(backend, PROMPTS, SamplingParams(n=2, seed=5))
    assert sorted(out) == list(range(len(PROMPTS))) and all(len(v) == 2 for v in out.values())
    assert len(server.requests) > 12  # some answered 500 and were retried
    assert server.max_in_flight <= 2
    first = server.requests[0]
    assert first["path"] == "/v1/completions" and first["model"] == "served-name" and first["auth"] == "Bearer k"
    assert isinstance(first["prompt"], list) and first["temperature"] == 0.7 and first["top_p"] == 0.95
    seeds = {r["seed"] for r in server.requests}
    assert len(seeds) == 12  # one distinct seed per sample, the same seed on each retry
    assert {c.text.split()[-1] for v in out.values() for c in v} == {str(s) for s in seeds}
    c = out[0][0]
    assert (c.prompt_tokens, c.completion_tokens, c.finish_reason) == (99, 7, "stop")


def test_timeouts_are_retried(server_factory):
    server = server_factory(slow_first=1.0)
    backend = OpenAIBackend(server.url, "m", timeout=0.3, backoff=0.01, concurrency=1)
    out = collect(backend, PROMPTS[:2], SamplingParams(max_new_tokens=3))
    assert len(out) == 2 and out[0][0].finish_reason == "length"
    assert len(server.requests) == 3


def test_gives_up_after_max_retries_and_fails_fast_on_client_errors(server_factory):
    down = server_factory(fail_every=1)
    with pytest.raises(DeliaError, match="gave up after 3 attempts.*HTTP 500"):
        collect(OpenAIBackend(down.url, "m", max_retries=2, backoff=0.01), PROMPTS[:1], SamplingParams())
    bad = server_factory(fail_every=1, status=400)
    with pytest.raises(DeliaError, match="HTTP 400"):
        collect(OpenAIBackend(bad.url, "m", backoff=0.01), PROMPTS[:1], SamplingParams())
    assert len(bad.requests) == 1
    with pytest.raises(DeliaError, match="gave up"):  # nothing listening
        collect(OpenAIBackend("http://127.0.0.1:9/v1", "m", max_retries=1, backoff=0.01), PROMPTS[:1],
                SamplingParams())


def test_text_prompts_and_local_token_counts(server_factory, tiny_model):
    from delia.models import load_tokenizer

    tok = load_tokenizer(tiny_model, resolved=True)
    server = server_factory(usage=False)
    ids = tok("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False)["input_ids"]
    backend = OpenAIBackend(server.url, "m", prompt_format="text", tokenizer=tok, concurrency=3)
    (c,) = collect(backend, [ids], SamplingParams(temperature=0))[0]
    assert server.requests[0]["prompt"] == "<|im_start|>user\nhi<|im_end|>\n"
    assert server.requests[0]["top_p"] == 1.0 and server.requests[0]["temperature"] == 0
    assert c.prompt_tokens == len(ids)
    assert c.completion_tokens == len(tok(c.text, add_special_tokens=False)["input_ids"])
    with pytest.raises(DeliaError, match="tokenizer"):
        OpenAIBackend(server.url, "m", prompt_format="text")
