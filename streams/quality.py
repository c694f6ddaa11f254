"""Quality filters: which interactions are not fit to train on, and why.

Cheap checks run on every interaction (empty, too long, blocked terms, exact repeat of a
prompt from another session); the near-duplicate check (MinHash LSH from ``datasketch``,
word 3-shingles) runs only on interactions that would become training records, because it is
the expensive one. Repeats *within* a session (a rephrase, a regeneration) are expected and
never filtered. Filtered interactions still count for metrics and the router's rewards.
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from dataclasses import dataclass, field

from datasketch import MinHash, MinHashLSH

from streams.contract import Interaction

_NUM_PERM = 32
_PROTOTYPE = MinHash(num_perm=_NUM_PERM, seed=7)
_WORD = re.compile(r"\w+")


def _last_user_text(interaction: Interaction) -> str:
    return next((m.content for m in reversed(interaction.prompt) if m.role == "user"), "")


def _shingles(text: str) -> list[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) < 3:
        return [" ".join(words).encode()]
    return [" ".join(words[i : i + 3]).encode() for i in range(len(words) - 2)]


def _prompt_digest(prompt: str) -> str:
    return hashlib.blake2b(" ".join(_WORD.findall(prompt.lower())).encode(), digest_size=16).hexdigest()


def _minhash(text: str, scratch: MinHash) -> MinHash:
    # One reused signature: the LSH index keeps only band hashes, not the object, and a new
    # MinHash per prompt re-parses the permutations every time.
    scratch.clear()
    scratch.update_batch(_shingles(text))
    return scratch


@dataclass
class QualityFilter:
    max_prompt_chars: int
    blocked_terms: tuple[str, ...]
    near_duplicate_threshold: float
    memory: int = 20_000  # prompts remembered for repeat detection
    _exact: dict[str, str] = field(default_factory=dict)  # prompt hash -> session
    _lsh: MinHashLSH | None = None
    _scratch: MinHash | None = None
    _order: deque = field(default_factory=deque)  # (key, prompt hash) oldest first

    def __post_init__(self) -> None:
        self._lsh = MinHashLSH(threshold=self.near_duplicate_threshold, num_perm=_NUM_PERM)
        self._scratch = _PROTOTYPE.copy()
        self._blocked = tuple(t.lower() for t in self.blocked_terms)

    def check(self, interaction: Interaction) -> str | None:
        """The cheap filters: the first that applies, or None."""
        prompt = _last_user_text(interaction)
        if not prompt.strip() or not interaction.response.strip():
            return "empty"
        if sum(len(m.content) for m in interaction.prompt) + len(interaction.response) > self.max_prompt_chars:
            return "too_long"
        lowered = f"{prompt}\n{interaction.response}".lower()
        if any(term in lowered for term in self._blocked):
            return "blocked_term"
        if self._exact.get(_prompt_digest(prompt), interaction.session_id) != interaction.session_id:
            return "repeated_prompt"
        return None

    def near_duplicate(self, interaction: Interaction) -> bool:
        """True if a prompt from another session is near-identical; remembers this one."""
        prompt = _last_user_text(interaction)
        signature = _minhash(prompt, self._scratch)
        key = f"{interaction.session_id}\x00{interaction.interaction_id}"
        if any(not other.startswith(interaction.session_id + "\x00") for other in self._lsh.query(signature)):
            return True
        digest = _prompt_digest(prompt)
        self._lsh.insert(key, signature)
        self._exact[digest] = interaction.session_id
        self._order.append((key, digest))
        if len(self._order) > self.memory:
            old_key, old_digest = self._order.popleft()
            self._lsh.remove(old_key)
            if self._exact.get(old_digest) is not None:
                del self._exact[old_digest]
        return False
