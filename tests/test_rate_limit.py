"""Per-app token buckets: how many requests pass, and how long the rest must wait."""

from app.rate_limit import RateLimit, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_requests_pass_at_the_rate_and_the_wait_says_when():
    clock = Clock()
    limiter = RateLimiter({"chat": RateLimit(requests_per_s=2, burst=3)}, clock=clock)
    assert [limiter.wait_s("chat") for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]
    clock.now += 0.25
    assert limiter.wait_s("chat") == 0.25, "half a token has come back"
    clock.now += 0.25
    assert limiter.wait_s("chat") == 0.0
    clock.now += 60
    assert [limiter.wait_s("chat") for _ in range(4)] == [0.0, 0.0, 0.0, 0.5], "a quiet spell refills the burst only"


def test_apps_have_buckets_of_their_own_and_the_star_entry_covers_the_rest():
    clock = Clock()
    limiter = RateLimiter({"*": RateLimit(requests_per_s=1, burst=1), "big": RateLimit(requests_per_s=1, burst=5)},
                          clock=clock)  # fmt: skip
    assert [limiter.wait_s("small") for _ in range(2)] == [0.0, 1.0]
    assert [limiter.wait_s("other") for _ in range(2)] == [0.0, 1.0], "the star's limit is per app, not shared"
    assert [limiter.wait_s("big") for _ in range(5)] == [0.0] * 5
    assert RateLimiter({}).wait_s("anyone") == 0.0, "no limits set: no limit"


def test_retry_after_is_whole_seconds_rounded_up():
    assert [RateLimiter.retry_after(w)["Retry-After"] for w in (0.01, 1.0, 1.2)] == ["1", "1", "2"]
