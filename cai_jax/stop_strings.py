"""Stop strings as automata over tokens, for the sampler to advance on device (used by sampling.py).

A stop string is matched on bytes, across token boundaries: a KMP automaton over bytes is folded,
per start state, over every vocabulary entry's bytes, giving a table [states, V] that the decode
loop indexes with (state, sampled token) once per step.

    tables_KQV, final_K = stop_tables(tokenizer, ["\nHuman:"], vocab_size)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from cai_jax.text import token_bytes

__all__ = ["stop_tables"]


def _kmp_dfa(pattern: bytes) -> np.ndarray:
    """KMP automaton [m + 1, 256]: state = length of the longest pattern prefix ending here."""
    m = len(pattern)
    dfa = np.zeros((m + 1, 256), np.int32)
    dfa[0, pattern[0]] = 1
    fallback = 0
    for state in range(1, m):
        dfa[state] = dfa[fallback]
        dfa[state, pattern[state]] = state + 1
        fallback = dfa[fallback, pattern[state]]
    dfa[m] = m  # absorbing: once seen, the stop string stays seen
    return dfa


@functools.lru_cache(maxsize=32)
def _token_table(vocab_bytes: tuple[bytes, ...], pattern: bytes, vocab_size: int) -> np.ndarray:
    """[m + 1, V]: automaton state after reading a whole token's bytes from each state."""
    dfa = _kmp_dfa(pattern)
    m = len(pattern)
    width = max(1, max(len(b) for b in vocab_bytes))
    chars = np.full((vocab_size, width), -1, np.int32)
    for i, b in enumerate(vocab_bytes[:vocab_size]):
        chars[i, : len(b)] = np.frombuffer(b, np.uint8)
    table = np.empty((m + 1, vocab_size), np.int32)
    for start in range(m + 1):
        state = np.full(vocab_size, start, np.int32)
        for j in range(width):
            c = chars[:, j]
            step = (c >= 0) & (state != m)
            state = np.where(step, dfa[state, np.maximum(c, 0)], state)
        table[start] = state
    return table


def stop_tables(tokenizer, stop_strings: Sequence[str], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Stacked automata [K, Q, V] and their accepting states [K] for `stop_strings`."""
    if not stop_strings:
        return np.zeros((0, 1, vocab_size), np.int32), np.zeros((0,), np.int32)
    if tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (lm.tokenizer is None)")
    vocab = token_bytes(tokenizer)
    vocab = tuple(vocab) + (b"",) * max(0, vocab_size - len(vocab))
    patterns = [s.encode("utf-8") for s in stop_strings]
    if not all(patterns):
        raise ValueError(f"empty stop string in {list(stop_strings)!r}")
    q = max(len(p) for p in patterns) + 1
    tables = np.zeros((len(patterns), q, vocab_size), np.int32)
    for k, p in enumerate(patterns):
        t = _token_table(vocab, p, vocab_size)
        tables[k, : t.shape[0]] = t
    return tables, np.array([len(p) for p in patterns], np.int32)
