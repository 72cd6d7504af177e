"""Back end for any OpenAI-compatible server (vLLM serve, llama.cpp server, TGI, SGLang): the
completions endpoint with token-id prompts (or the rendered text), a concurrency limit, timeouts and
retries with exponential backoff. Standard library only.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Literal

from delia.backends.base import Completion, SamplingParams, request_seeds
from delia.errors import DeliaError

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIBackend:
    """POSTs `{base_url}/completions` (base_url like `http://host:8000/v1`), one request per sample.

    `prompt_format="tokens"` sends token ids (vLLM, llama.cpp and SGLang accept them, and nothing
    re-tokenizes the chat template); `"text"` sends the decoded prompt for servers that only take text
    (they must not add a BOS of their own). `tokenizer` decodes text prompts and counts completion
    tokens where the server reports no usage.
    """

    name = "openai"

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 300.0, max_retries: int = 5, backoff: float = 1.0,
                 prompt_format: Literal["tokens", "text"] = "tokens", tokenizer: Any = None):
        if not base_url.startswith(("http://", "https://")):
            raise DeliaError(f"`base_url` must start with http:// or https://, got {base_url!r}")
        if prompt_format not in ("tokens", "text"):
            raise DeliaError(f"prompt_format must be 'tokens' or 'text', got {prompt_format!r}")
        if prompt_format == "text" and tokenizer is None:
            raise DeliaError("prompt_format='text' needs the model's tokenizer to render prompts")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise DeliaError("concurrency must be >= 1, max_retries >= 0 and timeout > 0")
        self.url = base_url.rstrip("/") + "/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.concurrency, self.timeout, self.max_retries, self.backoff = concurrency, timeout, max_retries, backoff
        self.prompt_format = prompt_format
        self.tokenizer = tokenizer

    def body(self, prompt: Sequence[int], params: SamplingParams, seed: int) -> dict[str, Any]:
        """The JSON request for one sample."""
        text = self.tokenizer.decode(list(prompt), skip_special_tokens=False) if self.prompt_format == "text" else None
        return {"model": self.model, "prompt": text if text is not None else list(prompt), "n": 1,
                "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                "top_p": 1.0 if params.greedy else params.top_p, "seed": seed}

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            delay = self.backoff * 2**attempt * (0.5 + random.random())
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:300]
                if e.code not in RETRY_STATUS:
                    raise DeliaError(f"{self.url}: HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    delay = max(delay, float(retry_after))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except json.JSONDecodeError as e:
                last = f"invalid JSON response: {e}"
            if attempt < self.max_retries:
                time.sleep(min(delay, 60.0))
        raise DeliaError(f"{self.url}: gave up after {self.max_retries + 1} attempts; last error: {last}")

    def _complete(self, prompt: Sequence[int], params: SamplingParams, sample: int, seed: int) -> Completion:
        reply = self._post(self.body(prompt, params, seed))
        try:
            choice = reply["choices"][0]
            text = choice["text"]
        except (KeyError, IndexError, TypeError):
            raise DeliaError(f"{self.url}: unexpected response {str(reply)[:300]}") from None
        usage = reply.get("usage") or {}
        n_tokens = usage.get("completion_tokens")
        if n_tokens is None:
            n_tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if self.tokenizer else 0
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        return Completion(text, finish, int(usage.get("prompt_tokens") or len(prompt)), int(n_tokens), sample)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> Iterator[tuple[int, Completion]]:
        """Yield samples as they arrive, at most `concurrency` requests in flight."""
        jobs = iter([(i, k, s) for i, ss in enumerate(request_seeds(len(prompts), params, seeds))
                     for k, s in enumerate(ss)])
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="delia-openai")
        running: dict[Future[Completion], int] = {}
        try:
            while True:
                for i, k, seed in jobs:
                    running[pool.submit(self._complete, prompts[i], params, k, seed)] = i
                    if len(running) >= self.concurrency:
                        break
                if not running:
                    return
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    yield running.pop(future), future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
