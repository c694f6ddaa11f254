"""The near-duplicate filter's MinHash signatures are datasketch's, bit for bit."""

import random

import numpy as np
from datasketch import MinHash

from streams.quality import _shingles, minhash_signature


def test_signatures_equal_datasketch_minhash():
    rng = random.Random(3)
    words = "how do i reverse a list in python the river flows to sea 42 ünïcode ok".split()
    texts = ["", "one", "two words"] + [" ".join(rng.choices(words, k=rng.randrange(1, 40))) for _ in range(200)]
    for text in texts:
        reference = MinHash(num_perm=32, seed=7)
        reference.update_batch(_shingles(text))
        assert np.array_equal(minhash_signature(text), reference.hashvalues), text
