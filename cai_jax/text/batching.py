"""Padding token sequences into static-shape batches, and bucket sizes that bound recompiles."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None, multiple_of: int, left: bool):
    """Shared body of left_pad/right_pad."""
    if len(seqs) == 0:
        raise ValueError("cannot pad an empty list of sequences")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    arrays = []
    for i, seq in enumerate(seqs):
        arr = np.asarray(seq, dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError(f"sequence {i}: expected a flat list of token ids, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"sequence {i} is empty")
        arrays.append(arr)
    longest = max(a.size for a in arrays)
    if length is None:
        length = longest
    elif longest > length:
        i = next(i for i, a in enumerate(arrays) if a.size > length)
        raise ValueError(f"sequence {i} has {arrays[i].size} tokens, more than length={length}")
    length = -(-length // multiple_of) * multiple_of
    tokens_BL = np.full((len(arrays), length), pad_id, dtype=np.int32)
    mask_BL = np.zeros((len(arrays), length), dtype=np.bool_)
    for b, arr in enumerate(arrays):
        cols = slice(length - arr.size, length) if left else slice(0, arr.size)
        tokens_BL[b, cols] = arr
        mask_BL[b, cols] = True
    return tokens_BL, mask_BL


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None, multiple_of: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads sequences into one batch, so every prompt ends at the last column (for sampling).

    Args:
      seqs: B non-empty sequences of token ids.
      pad_id: id written into padded positions.
      length: target length L; defaults to the longest sequence.
      multiple_of: round L up to a multiple of this.

    Returns:
      tokens_BL: int32 [B, L] token ids.
      mask_BL: bool [B, L], True on real tokens.

    Raises:
      ValueError: on an empty list, an empty sequence, or a sequence longer than `length`.
    """
    return _pad(seqs, pad_id, length, multiple_of, left=True)


def right_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None, multiple_of: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads sequences into one batch, so every sequence starts at column 0 (for training).

    Args:
      seqs: B non-empty sequences of token ids.
      pad_id: id written into padded positions.
      length: target length L; defaults to the longest sequence.
      multiple_of: round L up to a multiple of this.

    Returns:
      tokens_BL: int32 [B, L] token ids.
      mask_BL: bool [B, L], True on real tokens.

    Raises:
      ValueError: on an empty list, an empty sequence, or a sequence longer than `length`.
    """
    return _pad(seqs, pad_id, length, multiple_of, left=False)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_STEPS_PER_OCTAVE = 4


def bucket_length(n: int, min_bucket: int = 16) -> int:
    """A padded length for n tokens from a small set of sizes, so jitted functions rarely recompile.

    Four sizes per doubling: n is rounded up to a multiple of 2^(floor(log2 n) - 2), e.g. 42 -> 48,
    100 -> 112, 300 -> 320, 1500 -> 1536. Padding wastes at most a quarter (about an eighth on
    average) of the work, against up to half for power-of-two buckets; prefill of long prompts is
    the costliest part of sampling, so the extra compiles (four per octave) pay for themselves.

    Args:
      n: the number of tokens (>= 0).
      min_bucket: the smallest bucket returned.

    Returns:
      The bucket length, >= max(n, min_bucket).
    """
    if n < 0:
        raise ValueError(f"length must be >= 0, got {n}")
    if n <= min_bucket:
        return min_bucket
    step = max(1, (1 << (int(n).bit_length() - 1)) // _STEPS_PER_OCTAVE)
    return max(-(-n // step) * step, min_bucket)


def pad_batch_size(b: int) -> int:
    """A padded batch size from a small set, so a sampler sees few distinct batch sizes.

    Powers of two up to 8, then multiples of 8: 3 -> 4, 9 -> 16, 18 -> 24, 33 -> 40. On a CPU a
    decode step of a few dozen rows is bound by its matmuls, so padded rows cost what real ones
    do: 18 rows padded to 32 sampled 1.24x slower than padded to 24 (BENCHMARKS.md). Above 8 a
    stage's call sizes are the same few (its batch size and one remainder) either way.

    Args:
      b: the batch size (>= 1).

    Returns:
      The padded batch size.
    """
    if b < 1:
        raise ValueError(f"batch size must be >= 1, got {b}")
    return _next_power_of_two(b) if b <= 8 else -(-b // 8) * 8
