"""Quality filters: which interactions are not fit to train on, and why.

Cheap checks run on every interaction (tool use, a stream the client left, empty, too long,
blocked terms, exact repeat of a prompt from another session); the near-duplicate check (MinHash LSH over word 3-shingles)
runs only on interactions that would become training records, because it is the expensive
one. Repeats *within* a session (a rephrase, a regeneration) are expected and never filtered.
Filtered interactions still count for metrics and the router's rewards.

The MinHash signatures and the LSH band layout are ``datasketch``'s (its permutations, its
hash function, its choice of bands for the threshold): :func:`minhash_signature` computes
exactly what ``MinHash.update_batch`` does, without the per-call overhead that made it the
pipeline's most expensive step, and :class:`_BandIndex` is a plain-dict LSH index.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from datasketch import MinHash, MinHashLSH

from streams.contract import STREAM_INTERRUPTED, Interaction

_NUM_PERM = 32
_PERMUTATIONS = MinHash(num_perm=_NUM_PERM, seed=7).permutations  # datasketch's "affine32" a, b
_WORD = re.compile(r"\w+")


def _last_user_text(interaction: Interaction) -> str:
    return next((m.content for m in reversed(interaction.prompt) if m.role == "user"), "")


def _shingles(text: str) -> list[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) < 3:
        return [" ".join(words).encode()]
    return [" ".join(words[i : i + 3]).encode() for i in range(len(words) - 2)]


@lru_cache(maxsize=256)  # check() and then near_duplicate() digest the same prompt
def _prompt_digest(prompt: str) -> str:
    return hashlib.blake2b(" ".join(_WORD.findall(prompt.lower())).encode(), digest_size=16).hexdigest()


def _hash32(shingle: bytes) -> int:
    """datasketch's ``sha1_hash32`` followed by its "affine32" pre-mix (MurmurHash3 fmix32)."""
    h = struct.unpack("<I", hashlib.sha1(shingle).digest()[:4])[0]
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def minhash_signature(text: str) -> np.ndarray:
    """``MinHash(num_perm=32, seed=7)`` updated with the text's shingles: its hashvalues."""
    hashes = np.array([_hash32(s) for s in _shingles(text)], dtype=np.uint32)
    a, b = _PERMUTATIONS
    return (hashes[:, None] * a + b).min(axis=0)  # uint32 wraparound is the scheme's mod 2^32


@dataclass
class _BandIndex:
    """LSH index: keys whose signatures agree on all rows of at least one band are candidates."""

    bands: list[tuple[int, int]]  # (start, end) of each band's rows in the signature
    buckets: list[dict[bytes, set[str]]] = field(init=False)  # per band: rows -> keys
    band_keys: dict[str, tuple[bytes, ...]] = field(default_factory=dict)  # key -> its rows per band

    def __post_init__(self) -> None:
        self.buckets = [{} for _ in self.bands]

    def keys_of(self, signature: np.ndarray) -> tuple[bytes, ...]:
        return tuple(signature[start:end].tobytes() for start, end in self.bands)

    def query(self, band_keys: tuple[bytes, ...]) -> set[str]:
        found: set[str] = set()
        for bucket, band_key in zip(self.buckets, band_keys):
            found.update(bucket.get(band_key, ()))
        return found

    def insert(self, key: str, band_keys: tuple[bytes, ...]) -> None:
        self.band_keys[key] = band_keys
        for bucket, band_key in zip(self.buckets, band_keys):
            bucket.setdefault(band_key, set()).add(key)

    def remove(self, key: str) -> None:
        for bucket, band_key in zip(self.buckets, self.band_keys.pop(key)):
            members = bucket[band_key]
            members.discard(key)
            if not members:
                del bucket[band_key]


@dataclass
class QualityFilter:
    max_prompt_chars: int
    blocked_terms: tuple[str, ...]
    near_duplicate_threshold: float
    memory: int  # prompts remembered for repeat detection (FEEDLOOP_PIPELINE__REPEAT_MEMORY)
    _exact: dict[str, str] = field(default_factory=dict)  # prompt hash -> session
    _lsh: _BandIndex | None = None
    _order: deque = field(default_factory=deque)  # (key, prompt hash) oldest first

    def __post_init__(self) -> None:
        layout = MinHashLSH(threshold=self.near_duplicate_threshold, num_perm=_NUM_PERM).hashranges
        self._lsh = _BandIndex(layout)
        self._blocked = tuple(t.lower() for t in self.blocked_terms)

    def check(self, interaction: Interaction) -> str | None:
        """The cheap filters: the first that applies, or None."""
        if interaction.tool_calls or any(m.role == "tool" or m.tool_calls for m in interaction.prompt):
            return "tool_use"  # the trainer formats plain chats only: a tool turn would train as text
        if interaction.metadata.get(STREAM_INTERRUPTED):
            return "interrupted"  # the client left mid-answer: what it got is not the whole answer
        prompt = _last_user_text(interaction)
        if not prompt.strip() or not interaction.response.strip():
            return "empty"
        if sum(len(m.content) for m in interaction.prompt) + len(interaction.response) > self.max_prompt_chars:
            return "too_long"
        if self._blocked:  # most deployments block nothing: skip lower-casing the text
            lowered = f"{prompt}\n{interaction.response}".lower()
            if any(term in lowered for term in self._blocked):
                return "blocked_term"
        if self._exact.get(_prompt_digest(prompt), interaction.session_id) != interaction.session_id:
            return "repeated_prompt"
        return None

    def near_duplicate(self, interaction: Interaction) -> bool:
        """True if a prompt from another session is near-identical; remembers this one."""
        prompt = _last_user_text(interaction)
        band_keys = self._lsh.keys_of(minhash_signature(prompt))
        key = f"{interaction.session_id}\x00{interaction.interaction_id}"
        if any(not other.startswith(interaction.session_id + "\x00") for other in self._lsh.query(band_keys)):
            return True
        digest = _prompt_digest(prompt)
        self._lsh.insert(key, band_keys)
        self._exact[digest] = interaction.session_id
        self._order.append((key, digest))
        if len(self._order) > self.memory:
            old_key, old_digest = self._order.popleft()
            self._lsh.remove(old_key)
            if self._exact.get(old_digest) is not None:
                del self._exact[old_digest]
        return False
