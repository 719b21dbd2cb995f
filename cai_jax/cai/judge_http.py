"""A judge behind an OpenAI-compatible HTTP server: `feedback_model.name = "http://host:port"`.

Researchers often label with a large model served by vLLM (or another server that speaks the
OpenAI completions protocol) while they train a small one. `HTTPJudge` reads the option log-probs
from the prompt log-probs such a server echoes: for every (question, option) it sends

    POST {url}/v1/completions
    {"prompt": question + option, "echo": true, "logprobs": 1, "max_tokens": 1, "temperature": 0}

and the server answers with the prompt's tokens, their log-probs and character offsets
(`choices[0].logprobs.tokens`, `.token_logprobs`, `.text_offset`), followed by the one generated
token (`max_tokens=1`: vLLM refuses 0). The option's score is the sum of the log-probs
of its tokens, delimited as follows (`option_span`):

* The generated tokens are the last `usage.completion_tokens` entries (when the server reports
  usage; else the entries whose offset is past the prompt) and are dropped.
* Offsets are read relative to the end of the prompt's last token, because a server that decodes
  each token on its own may count a multi-byte character split across tokens differently from the
  prompt string, which shifts the absolute offsets of everything after it, but never the
  distances between the option's own (ASCII) tokens. A token belongs to the option when it ends
  inside the option's characters, so a token that straddles the question/option boundary counts
  for the option, as it does for `LMJudge` (whose option ids are what follows the longest prefix
  shared by the question's tokens and every joint encoding).
* The first option token of a question is the earliest over its options (and the token lists
  before it must agree), so every option of one question is scored from the same prefix.

The two judges agree exactly (up to the server's arithmetic) when the question's own tokens are a
prefix of each question + option encoding, as for the " (A)"-style options after "The answer
is:" with a byte-level BPE tokenizer that splits words before a space (SmolLM2's);
tests/test_judge_http.py checks it against an in-process `LMJudge` on the embedded model to 1e-4.

BOS and chat templates: the server tokenises the prompt text itself, adding BOS where its
tokenizer does (as `LMJudge` does for raw text). With `rendering="chat"` the question text is a
rendered chat template, so the judge needs the judge model's tokenizer (`tokenizer=`) to render
it, and the server must read special-token text in a prompt as the special tokens.

Failures: each request is retried on connection errors, timeouts and HTTP 408 / 429 / 5xx, after
`backoff * 2**attempt` seconds, `retries` times; then `JudgeError` names the server and the last
error. A server that answers without prompt log-probs (no `logprobs`, `null` log-probs for the
option's tokens, or fewer tokens than the option needs: llama.cpp's own `llama-server` returns
log-probs of generated tokens only; vLLM with prefix caching may return `null` for cached prompt
tokens) raises `JudgeError` at once, naming the server. `option_logprobs` returns all of a
batch's scores or raises: no partial result, so the labeller never writes a partial shard.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cai_jax.cai.judge import JudgeError, JudgeQuestion, _num_options

__all__ = ["HTTP_PREFIXES", "HTTPJudge", "option_span"]

HTTP_PREFIXES = ("http://", "https://")
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_TRANSIENT = (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError)


class _Skipped(Exception):
    """A request not sent because an earlier one of the same call failed."""


def option_span(logprobs: dict, option: str, completion_tokens: int | None, prompt_chars: int) -> tuple[int, int]:
    """[start, end) of the option's tokens in an echoed completion's token list (module docstring).

    Args:
      logprobs: the choice's "logprobs" object ("tokens", "token_logprobs", "text_offset").
      option: the option string, the last characters of the prompt.
      completion_tokens: how many generated tokens follow the prompt's (None: unknown).
      prompt_chars: len(prompt), used only when `completion_tokens` is unknown.

    Raises:
      ValueError: the lists are missing, disagree in length, or do not cover the option.
    """
    tokens, offsets = logprobs.get("tokens"), logprobs.get("text_offset")
    values = logprobs.get("token_logprobs")
    if not isinstance(tokens, list) or not isinstance(offsets, list) or not isinstance(values, list):
        raise ValueError("the logprobs object lacks tokens, token_logprobs or text_offset lists")
    if not len(tokens) == len(offsets) == len(values):
        raise ValueError(
            f"tokens ({len(tokens)}), token_logprobs ({len(values)}) and text_offset ({len(offsets)}) differ"
        )
    if completion_tokens is not None:
        end = len(tokens) - int(completion_tokens)
    else:
        end = sum(1 for o in offsets if o < prompt_chars)
    if end < 1:
        raise ValueError(f"{len(tokens)} tokens for the prompt and its {completion_tokens} generated tokens")
    # Offsets relative to the prompt's end: robust to shifted absolute offsets (module docstring).
    stop = offsets[end - 1] + len(tokens[end - 1])
    start = end
    while start > 0 and offsets[start - 1] + len(tokens[start - 1]) > stop - len(option):
        start -= 1
    if stop - offsets[start] < len(option) or not "".join(tokens[start:end]).endswith(option):
        raise ValueError(
            f"the echoed prompt tokens {tokens[max(0, end - 8) : end]!r} do not end with the option {option!r}"
        )
    return start, end


class HTTPJudge:
    """An OpenAI-compatible `/v1/completions` server as judge (module docstring).

    Args:
      url: "http://host:port" (optionally with a path prefix, with or without a trailing "/v1").
      model: the served model's name; None asks `GET /v1/models` once (and sends none if that
        endpoint is missing).
      tokenizer: the judge model's tokenizer, needed only to render chat questions.
      timeout: seconds per request.
      retries: further attempts after a failed one.
      backoff: seconds before the first retry, doubled each time.
      concurrency: requests in flight at once (one (question, option) per request).
    """

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        tokenizer: Any = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        concurrency: int = 8,
    ):
        if not url.startswith(HTTP_PREFIXES):
            raise JudgeError(f"judge {url!r}: expected an http:// or https:// URL")
        if retries < 0 or timeout <= 0 or backoff < 0 or concurrency < 1:
            raise JudgeError(
                f"judge {url}: timeout={timeout} must be > 0, retries={retries} and backoff={backoff} >= 0, "
                f"concurrency={concurrency} >= 1"
            )
        base = url.rstrip("/")
        base = base[: -len("/v1")] if base.endswith("/v1") else base
        self.name, self.base = url, base
        self.tokenizer, self.timeout, self.retries = tokenizer, float(timeout), int(retries)
        self.backoff, self.concurrency = float(backoff), int(concurrency)
        self._model, self._model_known = model, model is not None

    # ------------------------------------------------------------ transport

    def _request(self, path: str, body: dict | None) -> dict:
        """One JSON request with retries; returns the decoded answer."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.base + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code not in _RETRY_STATUS:
                    raise JudgeError(f"judge {self.name}: {path} answered HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
                continue
            except _TRANSIENT as e:
                last = f"{type(e).__name__}: {e}"
                continue
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                raise JudgeError(f"judge {self.name}: {path} answered non-JSON {raw[:200]!r}") from None
        raise JudgeError(
            f"judge {self.name}: no answer from {self.base}{path} after {self.retries + 1} attempts ({last})"
        )

    def _model_name(self) -> str | None:
        if not self._model_known:
            try:
                listing = self._request("/v1/models", None)
                self._model = listing["data"][0]["id"]
            except JudgeError as e:
                if "HTTP 404" not in str(e):
                    raise
                self._model = None  # no listing: send no model name
            except (KeyError, IndexError, TypeError):
                raise JudgeError(f"judge {self.name}: /v1/models lists no model (pass model=...)") from None
            self._model_known = True
        return self._model

    # ------------------------------------------------------------ scoring

    def _echo(self, prompt: str, option: str, model: str | None) -> tuple[list[str], list, int]:
        """The echoed prompt's tokens and log-probs, and where the option's tokens start."""
        body = {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0.0}
        if model is not None:
            body["model"] = model
        out = self._request("/v1/completions", body)
        where = f"judge {self.name}: /v1/completions"
        try:
            choice = out["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"{where} answered without choices: {str(out)[:200]}") from None
        lp = choice.get("logprobs")
        if not isinstance(lp, dict):
            raise JudgeError(
                f"{where} returned no log-probs for echo=true, logprobs=1: the server does not give prompt "
                "log-probs (vLLM does; llama.cpp's llama-server gives log-probs of generated tokens only)"
            )
        usage = out.get("usage") or {}
        try:
            start, end = option_span(lp, option, usage.get("completion_tokens"), len(prompt))
        except ValueError as e:
            raise JudgeError(
                f"{where} does not return the prompt log-probs of the option {option!r} with echo=true ({e}); "
                "llama.cpp's llama-server returns log-probs of generated tokens only"
            ) from None
        return lp["tokens"][:end], lp["token_logprobs"][:end], start

    def option_logprobs(self, questions: Sequence[JudgeQuestion]) -> np.ndarray:
        """float64 [N, K] log-probs of each question's options, read from the server (module docstring)."""
        if not questions:
            return np.zeros((0, 0), np.float64)
        k = _num_options(questions, self.name)
        model = self._model_name()
        jobs = [(q.text + o, o) for q in questions for o in q.options]
        failed = threading.Event()

        def echo(prompt: str, option: str):
            if failed.is_set():  # a failed request ends the call: the later ones are not sent
                raise _Skipped
            try:
                return self._echo(prompt, option, model)
            except BaseException:
                failed.set()
                raise

        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs))) as pool:
            futures = [pool.submit(echo, prompt, option) for prompt, option in jobs]
            # Jobs start in order, so the first error met in order is a real one, not a skip.
            echoes = [f.result() for f in futures]
        out = np.zeros((len(questions), k), np.float64)
        for i, q in enumerate(questions):
            rows = echoes[i * k : (i + 1) * k]
            # All options of a question are scored after the same tokens (module docstring).
            start = min(s for _, _, s in rows)
            if any(tokens[:start] != rows[0][0][:start] for tokens, _, _ in rows):
                raise JudgeError(
                    f"judge {self.name}: question {i}: the server tokenised its text differently per option"
                )
            if start == 0:
                raise JudgeError(f"judge {self.name}: question {i}: the options start at the prompt's first token")
            for j, (tokens, values, _) in enumerate(rows):
                picked = values[start:]
                if any(v is None for v in picked):
                    raise JudgeError(
                        f"judge {self.name}: /v1/completions returned null log-probs for the prompt tokens "
                        f"{tokens[start:]!r} of option {q.options[j]!r}: the server does not give prompt log-probs "
                        "(a vLLM server with prefix caching may not)"
                    )
                out[i, j] = float(sum(picked))
        return out
