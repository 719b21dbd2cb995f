"""A small OpenAI-compatible completions server over a cai_jax model, for the HTTP judge tests.

    python -m tests.judge_server --model smollm2-135m-instruct --port 8011

speaks the part of the protocol `cai_jax.cai.judge_http.HTTPJudge` uses, the way vLLM answers it:

    GET  /v1/models       {"data": [{"id": <model name>}]}
    POST /v1/completions  {"prompt": str | [str], "echo": bool, "logprobs": int | null,
                           "max_tokens": int, ...}

The prompt is tokenised as the server's tokenizer does by default (BOS where it adds one), scored
by one full causal forward pass (`Transformer.__call__`, right-padded to a bucketed length: not
the shared-prefix path the in-process judge uses, so the tests compare two computations), and
the greedy next `max_tokens` (0 or 1) tokens appended. With echo, `logprobs` lists every prompt
token (the first with log-prob null) then the generated one; `text_offset` is the running sum of
the lengths of the tokens decoded one by one, as vLLM computes it. `usage` counts both.

`Faults` makes the server misbehave on chosen request numbers (0-based, POST /v1/completions
only): close the connection without an answer, answer an HTTP error, answer late, or, like
llama.cpp's llama-server, give log-probs of the generated tokens only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jax
import numpy as np

from cai_jax.text import bucket_length


@dataclasses.dataclass
class Faults:
    """How the server misbehaves, by completions request number."""

    drop: set = dataclasses.field(default_factory=set)  # close the connection, no answer
    status: dict = dataclasses.field(default_factory=dict)  # request -> HTTP status to answer
    delay: dict = dataclasses.field(default_factory=dict)  # request -> seconds to wait first
    fail_from: int | None = None  # every request from this one on answers 503
    generated_logprobs_only: bool = False  # like llama-server: no prompt log-probs with echo


class _Model:
    """Prompt log-probs and the greedy next token from one forward pass (jitted per bucket).

    One per model object, shared by every server on it (so a test's second server is warm).
    """

    _instances: dict[int, _Model] = {}

    @classmethod
    def of(cls, lm: Any) -> _Model:
        if id(lm) not in cls._instances:
            cls._instances[id(lm)] = cls(lm)
        return cls._instances[id(lm)]

    def __init__(self, lm: Any):
        self.lm, self.lock = lm, threading.Lock()
        self.forward = jax.jit(lambda p, t, m: jax.nn.log_softmax(lm.model.apply({"params": p}, t, m), axis=-1))

    def __call__(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(log-prob of token t given tokens < t for t >= 1 [L - 1], log-probs of the next token [V])."""
        n = len(ids)
        length = bucket_length(n)
        tokens = np.zeros((1, length), np.int32)
        tokens[0, :n] = ids
        mask = np.arange(length)[None] < n
        with self.lock:
            logp = np.asarray(self.forward(self.lm.params, tokens, mask))[0]
        return logp[np.arange(n - 1), ids[1:]], logp[n - 1]


def _completion(model: _Model, tok: Any, prompt: str, body: dict, faults: Faults) -> tuple[dict, int, int]:
    ids = list(tok(prompt)["input_ids"])
    if not ids:
        raise ValueError("empty prompt")
    prompt_logp, next_logp = model(ids)
    generated = [int(np.argmax(next_logp))] if int(body.get("max_tokens", 16)) >= 1 else []
    gen_logp = [float(next_logp[g]) for g in generated]
    echo = bool(body.get("echo", False))
    shown = (ids if echo else []) + generated
    values = ([None] + prompt_logp.astype(float).tolist() if echo else []) + gen_logp
    pieces = [tok.decode([i]) for i in shown]
    text = (prompt if echo else "") + tok.decode(generated)
    logprobs = None
    if body.get("logprobs") is not None:
        if faults.generated_logprobs_only:
            pieces, values = pieces[len(shown) - len(generated) :], values[len(shown) - len(generated) :]
        offsets = np.cumsum([0] + [len(p) for p in pieces])[:-1].tolist()
        logprobs = {"tokens": pieces, "token_logprobs": values, "text_offset": offsets, "top_logprobs": None}
    return {"text": text, "logprobs": logprobs, "finish_reason": "length"}, len(ids), len(generated)


def make_server(lm: Any, *, host: str = "127.0.0.1", port: int = 0, faults: Faults | None = None, name: str = "judge"):
    """A `ThreadingHTTPServer` serving `lm` (call `serve_forever` in a thread; `.requests` counts POSTs)."""
    faults = faults or Faults()
    model, tok = _Model.of(lm), lm.tokenizer
    counter = {"n": 0}
    counter_lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet under pytest
            pass

        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path.rstrip("/") != "/v1/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            with counter_lock:
                i = counter["n"]
                counter["n"] += 1
            time.sleep(faults.delay.get(i, 0.0))
            if i in faults.drop:
                self.close_connection = True
                self.connection.shutdown(2)
                return
            code = faults.status.get(i) or (503 if faults.fail_from is not None and i >= faults.fail_from else None)
            if code:
                return self._send(code, {"error": {"message": f"fault injected on request {i}"}})
            prompts = body.get("prompt")
            prompts = [prompts] if isinstance(prompts, str) else prompts
            choices, n_prompt, n_gen = [], 0, 0
            for j, prompt in enumerate(prompts):
                choice, a, b = _completion(model, tok, prompt, body, faults)
                choices.append({"index": j, **choice})
                n_prompt, n_gen = n_prompt + a, n_gen + b
            usage = {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}
            self._send(200, {"object": "text_completion", "model": name, "choices": choices, "usage": usage})

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            # A client that gave up on a slow answer closed its socket: not the server's error.
            import sys

            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    server = Server((host, port), Handler)
    server.requests = counter  # type: ignore[attr-defined]
    return server


def main() -> None:
    from cai_jax.models import load_pretrained

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args()
    server = make_server(load_pretrained(args.model), host=args.host, port=args.port, name=args.model)
    print(f"serving {args.model} on http://{args.host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
