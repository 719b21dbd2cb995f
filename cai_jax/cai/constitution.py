"""Constitutions as data: schema, loading (project schema, CAI paper files, chat layout), sampling.

A constitution holds the principles of both stages of Constitutional AI (Bai et al. 2022, sec. 3
and 4) and their few-shot examples. Files in the project's schema are YAML or JSON with the same
structure (constitutions/README.md has a full example)::

    name: cai-jax-default             # required, non-empty
    version: "1"                      # required, string or number (quote it to keep "1.10")
    description: ...                  # optional free text
    sl_principles:                    # required list; sampled per critique -> revision round
      - id: harm_general              # unique among sl_principles
        critique_request: ...         # plain instruction, no "CritiqueRequest:" framing
        revision_request: ...         # plain instruction, no "RevisionRequest:" framing
    feedback_principles:              # required list; sampled per AI comparison
      - id: less_harmful
        text: Which of these assistant responses ...?   # no trailing "Options:"
    sl_few_shots:                     # optional
      - id: wifi
        conversation:                 # role: user (or human) / assistant / system; ends with assistant
          - {role: user, content: ...}
          - {role: assistant, content: ...}
        rounds:                       # each: principle_id and/or inline requests, then outputs
          - principle_id: illegal     # must name an sl_principle; its texts fill missing requests
            critique_request: ...     # optional with principle_id (inline text wins), else required
            critique: ...
            revision_request: ...     # same rule as critique_request
            revision: ...
    feedback_few_shots:               # optional
      - id: ex_partner
        conversation: [...]           # ends with a user turn; or `prompt: <text>` for one user turn
        options: [<reply A>, <reply B>]
        answer: B                     # "A" or "B"
        principle_id: less_harmful    # optional; must name a feedback principle
    cot_few_shots:                    # optional; as feedback_few_shots plus required `reasoning`
      - {id: ..., prompt: ..., options: [..., ...], answer: A, reasoning: ...}

Texts are stripped of surrounding whitespace; unknown fields are errors (they are usually typos).

`load_constitution` detects the format from the content, not the file name:

* a mapping with `sl_principles`/`feedback_principles`: the project's schema;
* a folder: the CAI paper's released prompts (any of the five files it finds; see
  `_constitution_import.PAPER_FILES`), or any one of those files alone (the rest stays empty).
  Framing ("\\n\\nCritiqueRequest: ...\\n\\nCritique:", trailing "Options:") is stripped; SL ids keep
  the file's keys, feedback ids are "paper_fb_<i>"; a few-shot round names the principle whose
  critique request it quotes exactly. In the feedback few-shots the correct reply is option (A) for
  even-numbered examples and (B) for odd ones; chain-of-thought few-shots keep their printed order,
  answer and reasoning, with the "{}" principle slot removed;
* a mapping with `constitutions: [{critic, revision}]` (optionally `system_chat`), or a bare list of
  `{critic, revision}`: the common chat layout. Principle ids are the entry's `id`/`name` if given,
  else "sl_<i>". Each `system_chat` transcript (leading system messages, then alternating
  user/assistant turns ending with assistant) becomes an SL few-shot: rounds start at the first
  user turn (after the first reply) whose text equals a listed `critic`, and run in groups of four
  (critique request, critique, revision request, revision); if no turn quotes a critic, a
  transcript of six or more turns ends with exactly one round, and a shorter one has no rounds.

The shipped default lives in `constitutions/default.yaml`, found in $CAI_JAX_CONSTITUTIONS (a
folder) if set, else in the repository's `constitutions/` folder beside the package; a
non-editable install must set the variable.

Sampling uses `np.random.default_rng(seed)`: the same seed gives the same principles on every
platform, and passing one Generator through several calls continues its stream.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cai_jax import atomic
from cai_jax.cai import _constitution_import as imp
from cai_jax.cai._constitution_schema import SCHEMA_MARKERS, parse_schema, to_dict
from cai_jax.cai._constitution_types import (
    Constitution,
    ConstitutionError,
    FeedbackFewShot,
    FeedbackPrinciple,
    SLFewShot,
    SLPrinciple,
    SLRound,
)

__all__ = [
    "Constitution",
    "ConstitutionError",
    "FeedbackFewShot",
    "FeedbackPrinciple",
    "SLFewShot",
    "SLPrinciple",
    "SLRound",
    "constitutions_dir",
    "default_constitution",
    "load_constitution",
    "sample_feedback_principles",
    "sample_sl_principles",
    "save_constitution",
]

ENV_DIR = "CAI_JAX_CONSTITUTIONS"
DEFAULT_NAME = "default.yaml"
_YAML_SUFFIXES = (".yaml", ".yml")


def constitutions_dir() -> Path:
    """The folder of shipped constitutions: $CAI_JAX_CONSTITUTIONS, else <repo>/constitutions.

    Raises:
      ConstitutionError: if neither exists (e.g. a non-editable install without the variable).
    """
    env = os.environ.get(ENV_DIR)
    candidates = [Path(env)] if env else []
    # cai_jax/cai/constitution.py -> parents[2] is the repository root in a checkout / editable install.
    candidates.append(Path(__file__).resolve().parents[2] / "constitutions")
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise ConstitutionError(
        f"no constitutions folder at {' or '.join(map(str, candidates))}; set ${ENV_DIR} to the "
        "repository's constitutions/ folder (needed when cai-jax is installed non-editable)"
    )


def default_constitution() -> Constitution:
    """The project's shipped default constitution (constitutions/default.yaml)."""
    return load_constitution(constitutions_dir() / DEFAULT_NAME)


def _parse_file(path: Path) -> Any:
    """Reads JSON or YAML (by suffix; unknown suffixes try JSON, then YAML) with the parser's line."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConstitutionError(f"cannot read: {e}", path=path) from e
    if path.suffix.lower() not in _YAML_SUFFIXES:
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            if path.suffix.lower() == ".json":
                raise ConstitutionError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", path=path) from e
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConstitutionError(f"invalid YAML{_yaml_problem(e)}", path=path) from e


def _at(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_problem(e: Exception) -> str:
    """ " at line L, column C: <problem>" of a PyYAML error, placed where the user must look.

    A quoted scalar (or bracket) left open runs to the end of the file, so the problem mark is the
    last line; the context mark is where the unclosed thing starts.
    """
    problem, context = getattr(e, "problem", None) or str(e), getattr(e, "context", None)
    mark, start = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
    if start is not None and context and ("end of stream" in problem or "<stream end>" in problem):
        thing = context.removeprefix("while scanning ").removeprefix("while parsing ")
        return f" at {_at(start)}: {thing} starts here and is never closed ({problem} at {_at(mark)})"
    return f" at {_at(mark)}: {problem}" if mark is not None else f": {problem}"


def _empty(name: str, version: str, source: Path) -> dict[str, Any]:
    return dict(name=name, version=version, sl_principles=[], feedback_principles=[], source=str(source))


def _paper(files: dict[str, tuple[Any, Path]], source: Path) -> Constitution:
    """Builds a Constitution from any subset of the paper's files, {file name: (parsed JSON, path)}."""
    parts = _empty("cai-paper", "2212.08073", source)
    sl = []
    if "CritiqueRevisionInstructions.json" in files:
        sl = parts["sl_principles"] = imp.paper_sl_principles(*files["CritiqueRevisionInstructions.json"])
    readers = {
        "CritiqueRevisionFewShotPrompts.json": ("sl_few_shots", lambda d, p: imp.paper_sl_few_shots(d, p, sl)),
        "RLMadisonInstructions.json": ("feedback_principles", imp.paper_feedback_principles),
        "RLMadisonFewShotPrompts.json": ("feedback_few_shots", imp.paper_feedback_few_shots),
        "RLMadisonPrecogFewShotPrompts.json": ("cot_few_shots", imp.paper_cot_few_shots),
    }
    for name, (field, read) in readers.items():
        if name in files:
            parts[field] = read(*files[name])
    return Constitution(**parts)


def _paper_kind(data: Any) -> str | None:
    """Which released paper file `data` looks like (by structure), or None."""
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "edit_request" in v for v in data.values()):
        return "CritiqueRevisionInstructions.json"
    if not isinstance(data, list) or not data:
        return None
    if all(isinstance(x, str) for x in data):
        if any("CritiqueRequest:" in x for x in data):
            return "CritiqueRevisionFewShotPrompts.json"
        return "RLMadisonInstructions.json"
    if all(isinstance(x, dict) for x in data):
        if all("corrects" in x for x in data):
            return "RLMadisonFewShotPrompts.json"
        if all(set(x) == {"prompt"} and "[[[" in str(x["prompt"]) for x in data):
            return "RLMadisonPrecogFewShotPrompts.json"
    return None


def _is_chat_layout(data: Any) -> bool:
    if isinstance(data, dict):
        return "constitutions" in data
    return isinstance(data, list) and bool(data) and all(isinstance(x, dict) and "critic" in x for x in data)


def load_constitution(path: str | os.PathLike) -> Constitution:
    """Loads a constitution, detecting its format from the content (see the module docstring).

    Args:
      path: a schema file (.yaml/.yml/.json), the paper's prompts folder or one of its files, a
        {"constitutions", "system_chat"} JSON file, or the bare name of a shipped constitution
        (e.g. "default" for constitutions/default.yaml).

    Returns:
      The validated Constitution (`source` records the path).

    Raises:
      ConstitutionError: naming the file, entry and field of the first problem found.
    """
    p = Path(path)
    if not p.exists() and p.name == str(path) and not p.suffix:
        shipped = constitutions_dir() / f"{p.name}.yaml"
        if shipped.is_file():
            p = shipped
    if p.is_dir():
        files = {n: (_parse_file(p / n), p / n) for n in imp.PAPER_FILES if (p / n).is_file()}
        if not files:
            raise imp.no_paper_files(p)
        return _paper(files, p)
    if not p.is_file():
        raise ConstitutionError("no such file or folder", path=p)
    data = _parse_file(p)
    if isinstance(data, dict) and any(k in data for k in SCHEMA_MARKERS):
        return parse_schema(data, p)
    if _is_chat_layout(data):
        sl, shots = imp.chat_layout(data, p)
        return Constitution(**{**_empty(p.stem, "imported", p), "sl_principles": sl, "sl_few_shots": shots})
    kind = _paper_kind(data)
    if kind is not None:
        return _paper({kind: (data, p)}, p)
    seen = f"a mapping with keys {sorted(map(str, data))[:8]}" if isinstance(data, dict) else type(data).__name__
    raise ConstitutionError(
        f"unrecognised constitution format ({seen}); expected the project's schema (sl_principles, "
        "feedback_principles, ...), a CAI paper prompt file, or {'constitutions': [...], 'system_chat': [...]}",
        path=p,
    )


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings as YAML block scalars so saved files stay readable."""


def _str_presenter(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value and not any(c in value for c in "\r\t") and value == value.strip() else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_presenter)


def save_constitution(constitution: Constitution, path: str | os.PathLike) -> Path:
    """Writes a constitution in the project's schema; the format follows the suffix (.json or .yaml/.yml).

    The file is validated before writing and replaced atomically, and loads back equal.

    Returns:
      The path written.

    Raises:
      ConstitutionError: for an unknown suffix, or a constitution that would not load back.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".json", *_YAML_SUFFIXES):
        raise ConstitutionError(f"unknown suffix {p.suffix!r} (use .json, .yaml or .yml)", path=p)
    d = to_dict(constitution)
    if suffix == ".json":
        out = json.dumps(d, indent=2, ensure_ascii=False) + "\n"
    else:
        out = yaml.dump(d, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=100)
    return atomic.write_text(p, out)  # a reader never sees a half-written constitution


def _sample(
    pool: list, n: int, rng_or_seed: int | np.random.Generator, k: int | None, kind: str, distinct: bool = False
) -> list:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConstitutionError(f"n={n!r} must be a non-negative int")
    count = len(pool)
    k = count if k is None else k
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= count:
        raise ConstitutionError(
            f"k={k!r} must be an int in [1, {count}] (the constitution has {count} {kind} principles)"
        )
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    if distinct and n <= k:
        return [pool[i] for i in rng.permutation(k)[: int(n)]]
    return [pool[i] for i in rng.integers(0, k, size=int(n))]


def sample_sl_principles(
    constitution: Constitution, n: int, rng_or_seed: int | np.random.Generator, k: int | None = None
) -> list[SLPrinciple]:
    """Draws n SL principles uniformly, with replacement, from the first k (paper sec. 3.1, 3.5).

    Args:
      constitution: the constitution.
      n: how many to draw (e.g. one per prompt and revision round).
      rng_or_seed: an int seed (a fresh `np.random.default_rng(seed)`) or a Generator to advance.
      k: restrict to the first k principles (number-of-principles ablation); None uses all.

    Returns:
      The n principles, in draw order.

    Raises:
      ConstitutionError: if n < 0 or k is outside [1, number of SL principles] (names k).
    """
    return _sample(constitution.sl_principles, n, rng_or_seed, k, "SL")


def sample_feedback_principles(
    constitution: Constitution,
    n: int,
    rng_or_seed: int | np.random.Generator,
    k: int | None = None,
    *,
    distinct: bool = False,
) -> list[FeedbackPrinciple]:
    """Draws n feedback principles uniformly from the first k (paper sec. 4.1).

    With replacement by default; `distinct=True` draws n different principles when n <= k (an
    ensemble of principles should ask n different questions), and falls back to drawing with
    replacement when the pool is smaller than n. Otherwise the same arguments and errors as
    `sample_sl_principles`.
    """
    return _sample(constitution.feedback_principles, n, rng_or_seed, k, "feedback", distinct)
