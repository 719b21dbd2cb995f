"""`load_judge`: the judge a `feedback_model.name` names (a Python callable, an HTTP server or a model).

Above both `cai_jax.cai.judge` (the interface, the LM and callable judges) and
`cai_jax.cai.judge_http` (which builds on that interface), so imports point one way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cai_jax.cai.judge import PYTHON_PREFIX, Judge, JudgeError, LMJudge, load_callable
from cai_jax.cai.judge_http import HTTP_PREFIXES, HTTPJudge

__all__ = ["load_judge"]


def load_judge(
    name: str,
    *,
    rendering: str = "raw",
    batch_size: int = 16,
    lm: Any = None,
    load_model: Callable[[str], Any] | None = None,
    tokenizer: Any = None,
    http: dict | None = None,
) -> Judge:
    """The judge a `feedback_model.name` names.

    Args:
      name: "python:<module>:<callable>" (`CallableJudge`), "http://host:port" or "https://..."
        (`HTTPJudge`), or anything `load_model` takes (a preset name, a folder, a .gguf file:
        `LMJudge`).
      rendering: how questions are rendered ("raw" or "chat"), for `LMJudge`'s BOS rule.
      batch_size: questions per device call (`LMJudge`).
      lm: an already loaded model for `name` (`LMJudge`; skips loading).
      load_model: name -> `LoadedModel` (default `cai_jax.models.load_pretrained`).
      tokenizer: the served model's tokenizer, for chat questions (`HTTPJudge`).
      http: `HTTPJudge` keywords (model, timeout, retries, backoff, concurrency).

    Raises:
      JudgeError: naming the judge (bad spec, unknown keywords).
    """
    if name.startswith(PYTHON_PREFIX):
        return load_callable(name)
    if name.startswith(HTTP_PREFIXES):
        try:
            return HTTPJudge(name, tokenizer=tokenizer, **(http or {}))
        except TypeError as e:
            raise JudgeError(f"judge {name}: {e}") from None
    if lm is None:
        if load_model is None:
            from cai_jax.models import load_pretrained as load_model
        lm = load_model(name)
    return LMJudge(lm, rendering=rendering, batch_size=batch_size, name=name)
