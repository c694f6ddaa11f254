"""Process wiring: build the long-running parts from settings and run them until stopped.

The CLI runs each part as its own process (`feedloop gateway`, `feedloop archive run`); the
demo and the tests run several in one event loop with the same functions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog
import uvicorn

from app.broker import ensure_topics
from app.gateway import create_app
from app.settings import Settings
from streams.store import make_engine, make_sessionmaker
from streams.archive import Archiver
from streams.broker_life import BrokerLife, cluster_id
from streams.lease import HeldLease, Leases, holder_id
from streams.topics import ARCHIVED_TOPICS

log = structlog.get_logger(__name__)

PIPELINE_CONSUMER = "feedloop-pipeline"
LEARNER_CONSUMER = "feedloop-learners"  # the learner's consumer group, checkpoint and lease


def tune_gc(batch: bool = False) -> None:
    """Garbage-collector settings for the long-running stream processes.

    The pipeline and the learners hold many long-lived objects (open interactions, seen ids,
    reservoirs); with the default thresholds the collector keeps walking them and costs about
    a third of the throughput. Objects alive after start-up are frozen out of collection,
    and the youngest generation is collected every 50,000 allocations instead of 700.

    ``batch`` (an offline replay): its state only grows until the end and no one waits on a
    pause, so it collects four times less often (~10% more events/s, benchmarks/RESULTS.md).
    """
    import gc

    gc.freeze()
    gc.set_threshold(*((200_000, 50, 1000) if batch else (50_000, 20, 100)))


async def build_archiver(settings: Settings) -> Archiver:
    await ensure_topics(settings)
    cluster = await cluster_id(settings.kafka)
    return Archiver(
        kafka_settings=settings.kafka,
        life=BrokerLife(settings.kafka, cluster, "archiver"),
        topics=ARCHIVED_TOPICS,
        objects=settings.objects,
        sessions=make_sessionmaker(make_engine(settings.store_url)),
        flush_events=settings.archive_flush_events,
        flush_seconds=settings.archive_flush_seconds,
    )


def gateway_server(settings: Settings) -> uvicorn.Server:
    """The gateway as a uvicorn server; ``await server.serve()`` runs it, ``should_exit`` stops it."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,  # our structlog set-up renders uvicorn's records too
        access_log=False,
        lifespan="on",
    )
    return uvicorn.Server(config)


async def wait_started(server: uvicorn.Server, task: asyncio.Task, timeout_s: float = 30.0) -> None:
    """Wait until uvicorn listens, failing fast if it died while starting."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not server.started:
        if task.done():
            task.result()  # re-raises the start-up error
            raise RuntimeError(f"gateway exited at start; is port {server.config.port} free?")
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"gateway did not start within {timeout_s}s")
        await asyncio.sleep(0.05)


def build_pipeline_app(settings: Settings, cluster: str):
    """The Faust app running the stream pipeline, with its state in the store."""
    from app.faust_app import make_faust_app
    from streams.agents import register_pipeline
    from streams.live import LivePipeline
    from streams.pii import Scrubber
    from streams.pipeline import PipelineSet
    from streams.pseudonyms import Pseudonymizer

    sessions = make_sessionmaker(make_engine(settings.store_url))
    pipelines = PipelineSet(settings.pipeline, Scrubber(), Pseudonymizer(settings.key_store()),
                            max_event_bytes=settings.max_event_bytes,
                            dead_letter_max_raw_bytes=settings.dead_letter_max_raw_bytes)
    live = LivePipeline(pipelines, sessions, objects=settings.objects, consumer=PIPELINE_CONSUMER,
                        cluster_id=cluster)
    app = make_faust_app(settings)
    register_pipeline(
        app, live, objects=settings.objects, sessions=sessions,
        idle_tick_s=settings.pipeline.idle_tick_s,
        checkpoint_interval_s=settings.pipeline.checkpoint_interval_s,
        checkpoint_max_loop_share=settings.pipeline.checkpoint_max_loop_share,
        partitions=settings.topic_partitions, life=BrokerLife(settings.kafka, cluster, "worker"),
    )  # fmt: skip
    return app


def build_learner_app(settings: Settings, cluster: str, lease: HeldLease):
    """The Faust app running the online learners: its own consumer group, run only by the
    process that holds the learner's lease (``LEARNER_CONSUMER``: streams/lease.py)."""
    from app.faust_app import make_faust_app
    from streams.learner_agents import LiveLearner, register_learners

    config = settings.learners
    sessions = make_sessionmaker(make_engine(settings.store_url))
    learner = LiveLearner(config, sessions, objects=settings.objects, consumer=LEARNER_CONSUMER,
                          cluster_id=cluster, snapshots_kept=config.snapshots_kept, lease=lease)  # fmt: skip
    app = make_faust_app(settings, name=LEARNER_CONSUMER)
    register_learners(app, learner, checkpoint_interval_s=config.checkpoint_interval_s,
                      life=BrokerLife(settings.kafka, cluster, "learner"), lease_renew_s=config.lease_renew_s)
    return app


def learner_standby(settings: Settings, beat: Callable[[], None]) -> HeldLease:
    """Wait as a standby learner until this process holds the learner's lease, calling
    ``beat`` (its liveness heartbeat) at every poll."""
    config = settings.learners
    leases = Leases(make_sessionmaker(make_engine(settings.store_url)), LEARNER_CONSUMER, ttl_s=config.lease_ttl_s)

    def beat_then_sleep(seconds: float) -> None:
        try:
            beat()
        except Exception as error:  # noqa: BLE001 - liveness reporting never stops the process it reports on
            log.warning("liveness.beat_failed", process="learner", error=str(error)[:300],
                        hint="check FEEDLOOP_DATABASE_URL; the standby goes on and beats again")  # fmt: skip
        time.sleep(seconds)

    lease = leases.standby(holder_id("learner"), poll_s=config.lease_renew_s, sleep=beat_then_sleep)
    lease.renew_while_starting(config.lease_renew_s)  # until the Faust app's own renewals begin
    return lease


def judge_model(settings: Settings) -> tuple[str, str]:
    """The judge's endpoint and model name: FEEDLOOP_JUDGE__BASE_URL and __MODEL, else the
    served base model (the first vLLM replica, under the zero-delta adapter's name, as the
    chat gateway asks for it: trainer/serving.py)."""
    from trainer.adapter_validation import base_model_sha256
    from trainer.serving import zero_delta_name

    config = settings.judge
    base_url = config.base_url or settings.vllm_urls[0].rstrip("/") + "/v1"
    if config.model is not None:
        return base_url, config.model
    try:
        sha = base_model_sha256(settings.model_path)
    except FileNotFoundError as exc:
        raise ValueError(f"{exc}: the default judge is the served base model; run `feedloop model init`, set "
                         "FEEDLOOP_BASE_MODEL_PATH, or name a judge in FEEDLOOP_JUDGE__MODEL") from exc  # fmt: skip
    return base_url, zero_delta_name(sha, settings.trainer.lora.rank)


async def build_annotator(settings: Settings):
    """`feedloop judge`: the self-evaluation annotator (streams/annotator.py) on its judge."""
    from datetime import timedelta

    from pydantic import ValidationError

    from streams.annotator import Annotator, OpenAIJudge
    from streams.contract import ID_ADAPTER
    from streams.judge_endpoint import async_judge_client, judge_api_key
    from streams.pii import Scrubber
    from streams.pseudonyms import Pseudonymizer, erased_by, user_identity

    await ensure_topics(settings)
    config = settings.judge
    base_url, model = judge_model(settings)
    try:
        name = ID_ADAPTER.validate_python(config.name or model)
    except ValidationError as exc:
        raise ValueError(f"the judge's name {config.name or model!r} is not an id an annotation can carry; set "
                         "FEEDLOOP_JUDGE__NAME") from exc  # fmt: skip
    client = async_judge_client(base_url, judge_api_key(config.api_key_env, where="FEEDLOOP_JUDGE__API_KEY_ENV"),
                                config.timeout_s)  # fmt: skip
    scrubber = Scrubber()
    pseudonyms = Pseudonymizer(settings.key_store())
    log.info("judge.starting", base_url=base_url, model=model, rubric=config.rubric_id, share=config.sample_share,
             max_per_hour=config.max_per_hour)  # fmt: skip
    return Annotator(
        config, settings.kafka, OpenAIJudge(client, model, config.max_reply_tokens), judge_name=name,
        window=timedelta(seconds=settings.pipeline.explicit_window_s),
        scrub=lambda text: scrubber.scrub(text).text,
        is_erased=lambda i: erased_by(pseudonyms.erased_at(user_identity(i.app_id, i.user_id)), i.occurred_at),
    )  # fmt: skip
