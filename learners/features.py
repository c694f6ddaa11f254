"""Deterministic featurizer shared by the router and the off-policy reward model."""

from __future__ import annotations

import math
import numbers
import zlib
from collections.abc import Mapping

import numpy as np

Context = Mapping[str, object]


class HashingFeaturizer:
    """Turns a context dict into a fixed-length vector, with no fitted state.

    Slot 0 is a constant bias. A categorical value (``str`` or ``bool``) adds 1.0 to the slot
    picked by the CRC-32 of ``"name=value"``; a number adds ``sign(x) * log1p(|x|)`` to the
    slot of ``"name"``. CRC-32 rather than ``hash()`` because Python salts string hashes per
    process, and a replay or a restarted worker must produce the same vector. The log squash
    keeps heavy-tailed counts (tokens, latencies) from dominating the ridge fits without a
    fitted scaler, so the vector depends on the context alone. ``None`` values are skipped.

    Parameters
    ----------
    dim
        Length of the vector, bias included. Distinct features may share a slot (hashing
        collisions); a larger ``dim`` makes that rarer at the cost of speed.

    Examples
    --------
    >>> featurizer = HashingFeaturizer(dim=8)
    >>> x = featurizer.transform({"domain": "code", "prompt_tokens": 0})
    >>> x.shape, float(x[0]), float(x.sum())
    ((8,), 1.0, 2.0)
    """

    def __init__(self, dim: int = 32):
        if dim < 2:
            raise ValueError("dim must leave room for the bias and at least one feature")
        self.dim = dim

    def _slot(self, key: str) -> int:
        return 1 + zlib.crc32(key.encode()) % (self.dim - 1)

    def transform(self, context: Context) -> np.ndarray:
        x = np.zeros(self.dim)
        x[0] = 1.0
        for name, value in context.items():
            if value is None:
                continue
            if isinstance(value, (str, bool)):
                x[self._slot(f"{name}={value}")] += 1.0
            elif isinstance(value, numbers.Real):
                x[self._slot(name)] += math.copysign(math.log1p(abs(value)), value)
            else:
                raise TypeError(f"feature {name!r}: unsupported type {type(value).__name__}")
        return x
