"""The typed configuration of the stream processes: the pipeline worker and the learner.

Each model is a field of ``app.settings.Settings`` (``FEEDLOOP_PIPELINE__*``,
``FEEDLOOP_LEARNERS__*``) and is handed to the code it configures, which never reads the
whole settings object. docs/configuration.md lists every field.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from streams.contract import Id
from streams.rewards import ScoreRule


class PipelineSettings(BaseModel):
    """The stream pipeline's windows, filters and batch curation (docs/pipeline.md).

    Set as ``FEEDLOOP_PIPELINE__<FIELD>``, e.g. ``FEEDLOOP_PIPELINE__BATCH_SIZE=256``.
    """

    implicit_window_s: float = Field(300, gt=0, description="Implicit signals count this long after the interaction.")
    explicit_window_s: float = Field(1800, gt=0, description="Explicit feedback counts this long; then the example is emitted.")
    allowed_lateness_s: float = Field(60, ge=0, description="Out-of-order slack before event time moves on.")
    max_clock_skew_s: float = Field(
        300, gt=0,
        description="An event dated more than this after it was received is dead-lettered (clock_skew), "
        "so a wrong clock cannot move event time.",
    )  # fmt: skip
    idle_tick_s: float = Field(5, gt=0, description="An idle partition gets a watermark tick after this much wall time.")
    checkpoint_interval_s: float = Field(
        2, gt=0, description="How often the worker saves partition state; records are acknowledged after it."
    )
    checkpoint_max_loop_share: float = Field(
        0.05, gt=0, le=1,
        description="At most this share of the worker's time goes to checkpoint snapshots: after one that took t, "
        "the next waits at least t/share, so large states stretch checkpoint_interval_s.",
    )  # fmt: skip
    batch_size: int = Field(256, ge=1, description="Cut a batch when this many new training records are buffered.")
    batch_max_wait_s: float = Field(3600, gt=0, description="... or when the oldest has waited this long (event time).")
    max_group_share: float = Field(0.5, gt=0, le=1, description="Largest share of one cohort/domain in a batch.")
    replay_fraction: float = Field(0.2, ge=0, lt=1, description="Share of each batch replayed from older examples.")
    reservoir_per_stratum: int = Field(200, ge=0, description="Older records kept per cohort/domain for replay.")
    heldout_share: float = Field(
        0.0, ge=0, lt=1,
        description="Share of examples held out of training (by a hash of the example id), written to each batch's "
        "held-out part for the gate's held-out feedback suite; 0: none.",
    )  # fmt: skip
    max_prompt_chars: int = Field(16_000, ge=1, description="Longer prompt+response pairs are not trained on.")
    blocked_terms: list[str] = Field(default_factory=list, description="Case-insensitive terms that keep an example out.")
    near_duplicate_threshold: float = Field(0.9, gt=0, le=1, description="MinHash Jaccard above which a prompt is a repeat.")
    repeat_memory: int = Field(
        20_000, ge=1, description="Prompts each partition remembers for the repeat filters; the oldest are forgotten."
    )
    seed: int = Field(0, description="Seed of the curator's sampling.")
    scores: dict[Id, ScoreRule] = Field(
        default_factory=dict,
        description="Reward rule per custom score name, as JSON: numeric (min, max), boolean (inverted) or "
        "categorical (labels), each on a channel (explicit, the default, or implicit). A score without a rule "
        "gives no reward.",
    )

    @property
    def event_time_span_s(self) -> float:
        """How far either side of an event's time the pipeline computes (windows, lateness,
        batch wait): an ``occurred_at`` nearer the ends of the calendar is refused."""
        return self.explicit_window_s + self.implicit_window_s + self.allowed_lateness_s + self.batch_max_wait_s


class LearnerSettings(BaseModel):
    """The online learners in the `feedloop learn` worker and the gateway's router (docs/learners.md).

    Set as ``FEEDLOOP_LEARNERS__<FIELD>``, e.g. ``FEEDLOOP_LEARNERS__INITIAL_ARMS='["base"]'``.
    """

    initial_arms: list[str] = Field(
        default_factory=lambda: ["base"], min_length=1,
        description="Adapters the router starts with, before any adapter_loaded event; the first is the champion.",
    )  # fmt: skip
    alpha: float = Field(
        1.0, ge=0, description="Router: width of the LinUCB confidence bonus, in standard deviations of each arm's "
        "mean reward (its noise estimated from the rewards).",
    )  # fmt: skip
    floor: float = Field(
        0.1, ge=0, le=1, description="Router: exploration share spread evenly over the arms before any reward; "
        "it shrinks as the arms' estimates firm up, down to min_propensity per arm.",
    )  # fmt: skip
    min_propensity: float = Field(
        0.001, ge=0, le=1, description="Router: least probability of every live arm (unless capped or pinned), "
        "so that logged propensities support off-policy evaluation.",
    )  # fmt: skip
    noise_prior_weight: float = Field(
        10.0, gt=0, description="Router: pseudo-rewards of the prior at each level of the noise estimate: "
        "an arm's residual variance is shrunk towards all arms', and that towards 0.25 (the most a reward in [0, 1] has).",
    )  # fmt: skip
    feature_dim: int = Field(32, ge=2, description="Router: length of the hashed context vector.")
    l2: float = Field(1.0, gt=0, description="Router: ridge penalty of each arm's regression.")
    seed: int = Field(0, description="Seed of the learner's router.")
    drift_features: list[str] = Field(
        default_factory=lambda: ["domain", "locale", "client", "cohort"],
        description="Context features whose mix is watched for drift; leave out high-cardinality ones.",
    )
    drift_recent_window: int = Field(30, ge=1, description="Observations averaged into a drift alarm's mean_after.")
    ab_alpha: float = Field(0.05, gt=0, lt=1, description="A/B test: total error level of promote/rollback.")
    ab_min_samples: int = Field(200, ge=1, description="A/B test: rewards each variant needs before a verdict.")
    ab_tau: float = Field(0.05, gt=0, description="A/B test: the lift it detects fastest.")
    ab_max_samples: int | None = Field(
        2000, ge=1, description="A/B test: rewards per variant after which a test with no verdict ends; the champion stays."
    )
    review_budget_per_hour: int = Field(20, ge=0, description="Most examples sent to human review per hour (event time).")
    review_hour_s: float = Field(
        3600, gt=0, description="The review budget's hour in seconds of event time; shorter only where time is "
        "compressed (the demo: 30).",
    )  # fmt: skip
    example_memory: int = Field(
        20_000, ge=1,
        description="Example ids the learner remembers, so an example the pipeline emits again (after a failed "
        "checkpoint) is not learned, nor counted in an A/B test, twice.",
    )  # fmt: skip
    checkpoint_interval_s: float = Field(
        1.0, gt=0, description="How often the learner saves its state and publishes a router snapshot."
    )
    snapshots_kept: int = Field(20, ge=1, description="Router snapshots kept in the store; older ones are deleted.")
    snapshot_poll_s: float = Field(1.0, gt=0, description="How often the gateway looks for a newer router snapshot.")
    route_seed: int | None = Field(
        None, description="Seed of the gateway's routing draws; unset: fresh entropy per process."
    )
    ab_min_share: float = Field(
        0.05, ge=0, le=1,
        description="Least share of traffic the champion and the challenger of a running A/B test keep, however "
        "sure the router is: the test weighs each reward by 1/propensity, so a smaller share makes it slower.",
    )
    canary_share: float = Field(
        0.1, gt=0, le=1,
        description="Most traffic a new adapter gets until its A/B test has ab_min_samples rewards of both arms "
        "and it is not behind the champion; then the router decides.",
    )

    lease_ttl_s: float = Field(
        8.0, gt=0,
        description="A standby `feedloop learn` takes over once the active one's lease has not been renewed for this "
        "long (each process on its own clock); the active stops itself when its renewals fail this long. "
        "A takeover then restores the checkpoint and joins the consumer group: about this plus 5-10 s.",
    )  # fmt: skip
    lease_renew_s: float = Field(
        2.0, gt=0,
        description="How often the active learner renews its lease (each checkpoint renews it too), and how often a "
        "standby reads it; at most a third of lease_ttl_s, so that a few failed renewals are not a takeover.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check_ab_samples(self) -> LearnerSettings:
        if self.ab_max_samples is not None and self.ab_max_samples < self.ab_min_samples:
            raise ValueError("ab_max_samples must be at least ab_min_samples (or null: no limit)")
        if self.lease_renew_s * 3 > self.lease_ttl_s:
            raise ValueError(f"lease_renew_s ({self.lease_renew_s}) must be at most a third of lease_ttl_s "
                             f"({self.lease_ttl_s}): raise FEEDLOOP_LEARNERS__LEASE_TTL_S or lower __LEASE_RENEW_S")
        return self
