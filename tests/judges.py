"""Judges with a known preference, for tests of learning (`feedback_model.name = "python:tests.judges:<name>"`).

The embedded 135M model is at chance as a judge, so a test that the pipeline *learns* needs a
judge whose preference is known and checkable: these prefer responses with a property, whatever
the principle asked. They follow the callable contract of `cai_jax.cai.judge`.
"""

from __future__ import annotations

PREFERRED = ("!",)  # characters the known-preference judge rewards
CONFIDENCE = 4.0  # log-score gap: p = sigmoid(4) = 0.982 for the response with the property


def has_property(text: str) -> bool:
    """The checkable property: the response contains one of the `PREFERRED` characters."""
    return any(c in text for c in PREFERRED)


def prefers_property(questions):
    """Option log-scores: CONFIDENCE for a response with the property, 0 without (ties give p = 0.5)."""
    return [[CONFIDENCE * has_property(r) for r in q.responses] for q in questions]
