"""The `feedloop` command line."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import sys
import time
from pathlib import Path

import click
import structlog

from app.liveness import PROCESSES
from app.logs import configure_logging
from app.settings import Settings

log = structlog.get_logger("feedloop")


def _settings(ctx: click.Context) -> Settings:
    return ctx.obj


class _Commands(click.Group):
    """Turns a missing broker into one log line and exit code 1, from whichever command met it."""

    def invoke(self, ctx: click.Context):
        from app.broker import BrokerUnreachable

        try:
            return super().invoke(ctx)
        except BrokerUnreachable as exc:
            log.error("broker.unreachable", detail=str(exc))
            ctx.exit(1)


@click.group(cls=_Commands)
@click.pass_context
def main(ctx: click.Context) -> None:
    """feedloop: keep a served LLM improving from its own users.

    Configuration comes from FEEDLOOP_* environment variables (see docs/configuration.md).
    """
    try:
        settings = Settings()
    except Exception as exc:  # pydantic's message names the bad variable
        raise click.ClickException(f"invalid configuration: {exc}") from exc
    configure_logging(settings.log_level, settings.log_format)
    if settings.private_files:
        keep_files_private(settings.data_dir)
    ctx.obj = settings


def keep_files_private(data_dir: Path) -> None:
    """Files this process creates are its user's alone (0600, directories 0700), and so is
    the data dir: it holds prompts, keys and checkpoints. Adapters are the exception the
    registry makes (0644/0755, for a vLLM running as another user; keep FEEDLOOP_ADAPTER_DIR
    outside the data dir then, as docker/compose.yaml does)."""
    os.umask(0o077)
    if data_dir.is_dir():
        data_dir.chmod(0o700)


def _heartbeat(settings: Settings, process: str, **reports):
    from app.liveness import Heartbeat

    return Heartbeat(process, _sessions(settings), settings.liveness, **reports)


def _serve_until_signal(settings: Settings, process: str, build) -> None:
    """``await build()`` gives a service with ``run()`` and ``stop()``: run it until it ends
    or SIGINT/SIGTERM, then stop it and wait for it to finish what it holds. Its heartbeat
    (app/liveness.py) beats meanwhile, with the service's ``liveness_detail()`` if it has one."""

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        service = await build()
        async with _heartbeat(settings, process, detail=getattr(service, "liveness_detail", dict)):
            task = asyncio.create_task(service.run())
            await asyncio.wait([task, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
            service.stop()
            await task

    asyncio.run(serve())


# --- broker -------------------------------------------------------------------------------


@main.command()
@click.option("--port", type=int, default=None, help="Default: FEEDLOOP_EMBEDDED_BROKER_PORT.")
@click.pass_context
def broker(ctx: click.Context, port: int | None) -> None:
    """Run the embedded Kafka-compatible broker (Tansu) on 127.0.0.1 until Ctrl-C."""
    from app.broker import EmbeddedBroker, ensure_topics

    settings = _settings(ctx)
    if port is not None:
        settings = settings.model_copy(update={"embedded_broker_port": port})
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it like Ctrl-C
    embedded = EmbeddedBroker(settings.embedded_broker_port)
    embedded.start()
    try:  # from here a stop signal, even during topic creation, ends the broker it started
        asyncio.run(ensure_topics(settings))
        click.echo(f"broker ready on {embedded.bootstrap_servers} (cluster {embedded.cluster_id}); Ctrl-C stops it")
        click.echo("it keeps everything in memory: run `feedloop archive run` to keep the events")
        while embedded.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        embedded.stop()


@main.command()
@click.pass_context
def up(ctx: click.Context) -> None:
    """Broker, store, archiver, gateway and a worker in one process tree, until Ctrl-C.

    For ingest on the embedded defaults: events in, archived, through the pipeline into
    batches. Nothing is trained or served (that is `feedloop demo`, or the parts one by one)."""
    from app.local_loop import run_up

    sys.exit(run_up(_settings(ctx), say=click.echo))


# --- store --------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Create or migrate the store (SQLite by default, PostgreSQL in production)."""


@db.command("upgrade")
@click.argument("revision", default="head")
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    import migrations

    url = _settings(ctx.parent).store_url
    migrations.upgrade(url, revision)
    click.echo(f"store at revision {migrations.current(url)}")


@db.command("downgrade")
@click.argument("revision")
@click.pass_context
def db_downgrade(ctx: click.Context, revision: str) -> None:
    """Revert migrations down to REVISION ('base' removes every table)."""
    import migrations

    url = _settings(ctx.parent).store_url
    migrations.downgrade(url, revision)
    click.echo(f"store at revision {migrations.current(url) or 'base'}")


@db.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Print the store's migration revision."""
    import migrations

    click.echo(migrations.current(_settings(ctx.parent).store_url) or "base (empty)")


# --- gateway and archive -------------------------------------------------------------------


@main.command()
@click.option("--host", default=None)
@click.option("--port", type=int, default=None)
@click.pass_context
def gateway(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Serve the HTTP gateway (POST /v1/events) until Ctrl-C."""
    import migrations
    from app.broker import ensure_topics
    from app.runtime import gateway_server

    settings = _settings(ctx)
    migrations.upgrade(settings.store_url)  # its heartbeat and the router live in the store
    # Before uvicorn: a broker missing at its start-up would be a traceback and an exit code 0.
    asyncio.run(ensure_topics(settings))
    updates = {k: v for k, v in (("gateway_host", host), ("gateway_port", port)) if v is not None}
    server = gateway_server(settings.model_copy(update=updates))

    async def serve() -> None:
        async with _heartbeat(settings, "gateway", ready=lambda: server.started):
            await server.serve()

    asyncio.run(serve())
    if not server.started:  # uvicorn logged why (a port taken); it returns all the same
        sys.exit(1)


def _run_faust(settings: Settings, process: str, build) -> None:
    """Migrate the store, create the topics, then run the Faust app ``build(settings, cluster)``
    with its heartbeat: ready once it has joined its consumer group and is not rebalancing."""
    import faust

    import migrations
    from app.broker import ensure_topics
    from app.runtime import tune_gc
    from streams.broker_life import cluster_id

    migrations.upgrade(settings.store_url)
    asyncio.run(ensure_topics(settings))
    app = build(settings, asyncio.run(cluster_id(settings.kafka)))

    def partitions() -> dict[str, list[int]]:
        held: dict[str, list[int]] = {}
        for tp in app.consumer.assignment():
            held.setdefault(tp.topic, []).append(tp.partition)
        return {"partitions": {topic: sorted(numbers) for topic, numbers in sorted(held.items())}}

    heartbeat = _heartbeat(settings, process, ready=lambda: app.rebalancing_count > 0 and not app.rebalancing,
                           detail=partitions)
    app.timer(settings.liveness.interval_s, name="liveness")(heartbeat.beat_once)
    tune_gc()

    class Worker(faust.Worker):
        def _setup_logging(self) -> None:  # keep feedloop's structlog set-up
            configure_logging(settings.log_level, settings.log_format)

    try:
        Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False).execute_from_commandline()
    finally:
        heartbeat.stopped()


@main.command()
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run the stream pipeline (a Faust worker) until Ctrl-C; start several to scale out."""
    from app.runtime import build_pipeline_app

    _run_faust(_settings(ctx), "worker", build_pipeline_app)


@main.command()
@click.pass_context
def learn(ctx: click.Context) -> None:
    """Run the online learners (router, drift, A/B test, review picks) until Ctrl-C.

    Their state is global (one router for the gateway), so unlike `feedloop worker` this
    does not scale out: start a second one as a standby. The one that holds the lease in the
    store learns; the others wait and take over when it stops renewing it
    (FEEDLOOP_LEARNERS__LEASE_TTL_S), from its last checkpoint."""
    import migrations
    from app.runtime import build_learner_app, learner_standby

    settings = _settings(ctx)
    migrations.upgrade(settings.store_url)  # the lease lives in the store
    standby = _heartbeat(settings, "learner", detail=lambda: {"role": "standby"})  # ready: waiting is its work
    lease = learner_standby(settings, beat=standby.beat)
    try:
        _run_faust(settings, "learner", functools.partial(build_learner_app, lease=lease))
    finally:
        lease.release()  # a standby takes over at once; a no-op for a learner another one fenced


@main.command()
@click.pass_context
def judge(ctx: click.Context) -> None:
    """Grade served answers with a model judge into self_eval annotations, until Ctrl-C.

    Reads the interactions on the events topic (a sampled share, within an hourly budget:
    FEEDLOOP_JUDGE__*), asks the judge (default: the served base model) by the rubric, and
    writes each grade back as a model annotation the pipeline joins (docs/pipeline.md)."""
    import migrations
    from app.runtime import build_annotator

    settings = _settings(ctx)
    migrations.upgrade(settings.store_url)  # its heartbeat lives in the store

    async def build():
        try:
            return await build_annotator(settings)
        except ValueError as exc:  # no judge to ask: say what to set
            raise click.ClickException(str(exc)) from exc

    _serve_until_signal(settings, "judge", build)


@main.command()
@click.option("--retry", "retry", default=None, metavar="BATCH",
              help="Put the failed BATCH back in line for the running trainer, then exit.")
@click.pass_context
def train(ctx: click.Context, retry: str | None) -> None:
    """Train each emitted batch into an adapter and announce it (adapter_ready), until Ctrl-C.

    A batch that cannot be trained is marked failed with its reason (`feedloop status`); fix
    the cause, then `feedloop train --retry BATCH`."""
    import migrations
    from streams.store import make_engine, make_sessionmaker
    from trainer.gate import load_suites
    from trainer.worker import TrainerWorker

    settings = _settings(ctx)
    migrations.upgrade(settings.store_url)
    if retry is not None:
        _retry_batch(settings, retry)
        return
    suites = load_suites(settings.trainer.gate.suites)  # a misnamed suite fails here, not mid-batch

    async def build() -> TrainerWorker:
        return TrainerWorker(settings.trainer, settings.kafka, make_sessionmaker(make_engine(settings.store_url)),
                             objects=settings.objects, base_model_dir=settings.model_path,
                             adapters_dir=settings.adapters_path, suites=suites, adapter_store=settings.adapter_store)  # fmt: skip

    _serve_until_signal(settings, "trainer", build)


def _retry_batch(settings: Settings, batch_id: str) -> None:
    from trainer.registry import Registry
    from trainer.worker import retry_batch

    sessions = _sessions(settings)
    try:
        event = retry_batch(sessions, settings.adapters_path, batch_id)
    except (LookupError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        _send_control(settings, event)
    except click.ClickException as error:  # back to failed: a retry without its event would wait forever
        Registry(sessions, settings.adapters_path).fail_batch(batch_id, f"its retry was not published: {error}")
        raise click.ClickException(f"{error}; then run the same command again") from error
    click.echo(f"batch {batch_id} is back in line ({event.event_id}); the trainer takes it next "
               "(`feedloop status` shows how it goes)")


@main.group()
def archive() -> None:
    """Keep every topic on disk (the log of record), and check it."""


@archive.command("run")
@click.pass_context
def archive_run(ctx: click.Context) -> None:
    """Consume all feedloop topics into archive segments until Ctrl-C."""
    import migrations
    from app.runtime import build_archiver

    settings = _settings(ctx.parent)
    migrations.upgrade(settings.store_url)

    _serve_until_signal(settings, "archiver", lambda: build_archiver(settings))


@archive.command("verify")
@click.pass_context
def archive_verify(ctx: click.Context) -> None:
    """Check every archived segment's object, checksum and record count against its row."""
    from streams.store import make_engine, make_sessionmaker
    from streams.archive import verify_archive

    settings = _settings(ctx.parent)
    with make_sessionmaker(make_engine(settings.store_url))() as session:
        report = verify_archive(session, settings.objects)
    click.echo(f"{report.segments} segments, {report.records} records")
    for problem in report.problems:
        click.echo(f"PROBLEM {problem}", err=True)
    if not report.ok:
        raise SystemExit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print what GET /v1/overview answers instead of tables.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """The loop at a glance: adapters, A/B tests, dead letters, batches, drift, lag, privacy."""
    from rich.console import Console
    from sqlalchemy.exc import SQLAlchemyError

    from app.overview import OverviewSource
    from app.status import render_status

    source = OverviewSource(_settings(ctx))
    try:
        overview = source.read()
    except SQLAlchemyError as exc:
        raise click.ClickException(f"cannot read the store ({str(exc).splitlines()[0]}); "
                                   "run `feedloop db upgrade` or set FEEDLOOP_DATABASE_URL") from exc
    finally:
        source.close()
    if as_json:
        click.echo(json.dumps(overview.to_json(), indent=2))
    else:
        render_status(overview, Console())


@main.command()
@click.argument("process", type=click.Choice(PROCESSES))
@click.option("--host", default=None, help="Whose heartbeat to check. Default: this host (a container's own).")
@click.pass_context
def health(ctx: click.Context, process: str, host: str | None) -> None:
    """Exit 0 if PROCESS on this host beats its heartbeat (a Docker health check), 1 if not.

    It reads the store (app/liveness.py): the process reports itself there every
    FEEDLOOP_LIVENESS__INTERVAL_S and is down once silent for FEEDLOOP_LIVENESS__DOWN_AFTER_S."""
    import socket

    from app.liveness import UP, process_views

    settings = _settings(ctx)
    host = host or socket.gethostname()
    with _sessions(settings)() as session:
        views = [v for v in process_views(session, settings.liveness, processes=[process]) if v.host == host]
    if not views:
        raise click.ClickException(f"no heartbeat of {process} on {host} in the store; is it running, and does it "
                                   "reach FEEDLOOP_DATABASE_URL?")
    newest = views[-1]
    click.echo(f"{process} {newest.host}:{newest.pid} {newest.state} (last beat {newest.beat_age_s:.0f} s ago)"
               + (f": {newest.why}" if newest.why else ""))
    if newest.state != UP:
        raise SystemExit(1)


@main.command()
@click.option("--offline", "mode", flag_value="offline", default=True, help="Run the pipeline here (default).")
@click.option("--republish", "mode", flag_value="republish", help="Put the records back onto the events topic.")
@click.option("--source", default="archive", show_default=True,
              help="'archive', or a JSON-lines file (.jsonl/.jsonl.gz) of archive lines or bare events.")
@click.option("--since", default=None, help="ISO time: records received at or after it.")
@click.option("--until", default=None, help="ISO time: records received before it.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Write batches (and a store) here instead: what-if runs never touch live batches.")
@click.option("--close-at-end/--keep-open", default=None,
              help="At the end of the input, close every window and cut every buffered record (default), or "
                   "stop where the input stops. Replaying the archive into the live data directory keeps them "
                   "open: the running worker still owns those windows.")  # fmt: skip
@click.option("--import", "import_run", default=None, metavar="RUN",
              help="Replay historical import RUN from the archive (feedloop.imports.v1), as it ran.")
@click.pass_context
def replay(ctx: click.Context, mode: str, source: str, since: str | None, until: str | None,
           data_dir: Path | None, close_at_end: bool | None, import_run: str | None) -> None:
    """Replay the event log: rebuild state and batches offline, or republish it."""
    from app.replay import run_replay

    sys.exit(run_replay(_settings(ctx), mode=mode, source=source, since=since, until=until, data_dir=data_dir,
                        close_at_end=close_at_end, import_run=import_run))


@main.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--run", default=None,
              help="Id of this import (default: 'import-' and a digest of the input). Prefixes its batch and "
                   "dead-letter ids; the same run id with the same input is not sent twice.")  # fmt: skip
@click.pass_context
def import_(ctx: click.Context, file: Path, run: str | None) -> None:
    """Import a historical log (JSON lines, .gz too) into the live loop, in event time.

    Its interactions and feedback, hours to months old, run through the pipeline in a state of
    their own, ordered by occurred_at, so every feedback joins as it would have live; every
    window closes at the end of the file. Examples go to the learners, batches to the trainer."""
    from app.importer import run_import

    sys.exit(run_import(_settings(ctx), source=str(file), run=run))


@main.command()
@click.option("--cause", default="operator", show_default=True, help="Recorded with the trigger.")
@click.pass_context
def curate(ctx: click.Context, cause: str) -> None:
    """Ask every partition's curator to cut a batch from what it holds now."""
    from streams import kafka
    from streams.agents import TRIGGER_KEY, curation_triggers
    from streams.topics import EVENTS

    settings = _settings(ctx)

    async def send() -> None:
        producer = kafka.producer(settings.kafka)
        await producer.start()
        try:
            for record in curation_triggers("manual", f"{cause}-{time.time_ns()}", settings.topic_partitions):
                await producer.send_and_wait(EVENTS.name, record.model_dump_json().encode(), key=TRIGGER_KEY,
                                             partition=record.partition)
        finally:
            await producer.stop()

    asyncio.run(send())
    click.echo(f"asked {settings.topic_partitions} partitions for a batch")


@main.command()
@click.argument("user_id")
@click.option("--app", "app_id", required=True, help="The app the user belongs to: a user id means something only "
              "within its app.")  # fmt: skip
@click.pass_context
def erase(ctx: click.Context, user_id: str, app_id: str) -> None:
    """Erase a user of an app: shred their pseudonym key, cut them out of the batches not yet
    trained, and name the adapters already trained on their data. Again: the same answer."""
    from app.erasure import erase_user
    from trainer.erasure import mark_announced

    settings = _settings(ctx)
    sessions = _sessions(settings)
    answer, announce = erase_user(settings.key_store(), sessions, app_id, user_id)
    click.echo(f"{app_id}'s user {'was erased' if answer.already_erased else 'erased'} at "
               f"{answer.erased_at.isoformat()}: their events before then are dropped from every later batch and "
               "replay, and from the batches not yet trained")  # fmt: skip
    if answer.retrain_adapters:
        click.echo(f"trained on their data, to retrain: {', '.join(answer.retrain_adapters)}")
    else:
        click.echo("no adapter was trained on their data")
    if announce is not None:
        try:
            _send_control(settings, announce)
        except click.ClickException as exc:
            # Erased all the same: the trainer applies the erasure from the store before it trains.
            click.echo(f"not announced on the control topic yet: {exc.message} Run the same command again once the "
                       "broker is up, so that the log holds the erasure too.", err=True)  # fmt: skip
            return
        mark_announced(sessions, announce.pseudonym)


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--batch", "batch_ids", multiple=True, metavar="ID", help="Export this batch (repeatable).")
@click.option("--since", default=None, help="ISO time: batches created at or after it (without --batch).")
@click.option("--until", default=None, help="ISO time: batches created before it (without --batch).")
@click.option("--app", default=None, help="Only records whose events are all of this app.")
@click.pass_context
def export(ctx: click.Context, out_dir: Path, batch_ids: tuple[str, ...], since: str | None, until: str | None,
           app: str | None) -> None:
    """Write curated batches as a Hugging Face dataset: a Parquet file per signal and a README card.

    Records of users erased since, or without training consent, are left out (docs/operations.md)."""
    from app.export import run_export
    from streams.export import NoBatches

    try:
        click.echo(run_export(_settings(ctx), out_dir, batch_ids=list(batch_ids), since=since, until=until, app=app))
    except NoBatches as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--alpha", type=float, default=None, help="The router's confidence bonus width (default: as logged).")
@click.option("--floor", type=click.FloatRange(0, 1), default=None,
              help="The router's exploration floor (default: as logged).")
@click.option("--min-propensity", type=click.FloatRange(0, 1), default=None,
              help="The least probability of every live arm (default: as logged).")
@click.option("--pin", default=None, metavar="ADAPTER", help="Send everything to this adapter instead.")
@click.option("--since", default=None, help="ISO time: decisions at or after it.")
@click.option("--until", default=None, help="ISO time: decisions before it.")
@click.option("--confidence", type=click.FloatRange(0.5, 0.999), default=0.95, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the estimates as JSON.")
@click.pass_context
def whatif(ctx: click.Context, alpha: float | None, floor: float | None, min_propensity: float | None,
           pin: str | None, since: str | None, until: str | None, confidence: float, as_json: bool) -> None:
    """What a router setting or a pin would have earned on the archived decisions (IPS, SNIPS, DR).

    Replays the learner over the archive and asks the candidate before each example; prints each
    estimate with its interval and the logged policy's value beside them (docs/operations.md)."""
    from app.whatif import Candidate, run_whatif

    try:
        candidate = Candidate(alpha=alpha, floor=floor, min_propensity=min_propensity, pin=pin)
        result = run_whatif(_settings(ctx), candidate, since=since, until=until, confidence=confidence)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else result.render())


# --- contract -----------------------------------------------------------------------------


@main.group()
def schema() -> None:
    """The event contract's JSON Schemas."""


@schema.command("export")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=Path("schemas/v1"))
def schema_export(directory: Path) -> None:
    """Write one JSON Schema file per record kind into DIRECTORY."""
    from streams.contract import SCHEMAS, json_schema

    directory.mkdir(parents=True, exist_ok=True)
    for name in sorted(SCHEMAS):
        (directory / f"{name}.json").write_text(json.dumps(json_schema(name), indent=2) + "\n")
    click.echo(f"wrote {len(SCHEMAS)} schemas to {directory}")


# --- models -------------------------------------------------------------------------------


@main.group()
def model() -> None:
    """The demo's tiny base model (built offline; nothing is ever downloaded).

    A real model needs no command: name its directory in FEEDLOOP_BASE_MODEL_PATH."""


@model.command("init")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--detailed-share", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Share of pretraining answers in the detailed style (the demo's base model uses 0.25).")
@click.option("--phrased-share", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of pretraining prompts worded with an opener or closer (the demo's uses 0.75).")
@click.option("--force", is_flag=True, help="Rebuild even if the model directory exists.")
@click.pass_context
def model_init(ctx: click.Context, seed: int, detailed_share: float, phrased_share: float, force: bool) -> None:
    """Build the tiny chat model of the demo's toy world at FEEDLOOP_BASE_MODEL_PATH."""
    from rich.progress import Progress

    from demo.base_model import ToyChats, build_tiny_model
    from trainer.base_model import METADATA_FILE, BaseModelConfig

    target = _settings(ctx.parent).model_path
    if (target / METADATA_FILE).exists() and not force:
        click.echo(f"{target} already holds a model; --force rebuilds it")
        return
    config = BaseModelConfig(seed=seed)
    chats = ToyChats(detailed_share=detailed_share, phrased_share=phrased_share)
    with Progress() as progress:
        task = progress.add_task("pretraining", total=config.train_steps)
        build_tiny_model(target, chats, config, on_step=lambda step, loss: progress.update(task, completed=step))
    click.echo(f"base model ready at {target}")


@main.command()
@click.option("--port", type=int, default=None, help="Default: the port of the first FEEDLOOP_VLLM_URLS entry.")
@click.option("--dtype", default="float32", show_default=True, help="bfloat16 on a GPU.")
@click.pass_context
def serve(ctx: click.Context, port: int | None, dtype: str) -> None:
    """Run a vLLM replica of the base model with runtime LoRA loading, on 127.0.0.1.

    Its served name, --max-lora-rank, --max-loras and --tool-call-parser come from FEEDLOOP_SERVING__*."""
    from urllib.parse import urlsplit

    from trainer.vllm_server import VllmServerConfig, serve as serve_vllm

    settings = _settings(ctx)
    serving = settings.serving
    port = port or urlsplit(settings.vllm_urls[0]).port or 8000
    serve_vllm(VllmServerConfig(model_path=settings.model_path, served_model_name=serving.served_model_name,
                                port=port, max_lora_rank=serving.max_lora_rank, max_loras=serving.max_loras,
                                tool_call_parser=serving.tool_call_parser, dtype=dtype))  # fmt: skip


@main.command()
@click.pass_context
def swap(ctx: click.Context) -> None:
    """Run the hot-swap controller: load announced adapters on every vLLM replica, promote, roll back."""
    import migrations
    from streams.control_consumer import ControlConsumer
    from streams.store import make_engine, make_sessionmaker
    from trainer.hot_swap import SwapController

    settings = _settings(ctx)
    migrations.upgrade(settings.store_url)
    if not settings.model_path.is_dir():
        raise click.ClickException(f"no base model at {settings.model_path}: run `feedloop model init`")
    controller = SwapController.from_settings(settings, make_sessionmaker(make_engine(settings.store_url)))

    async def handle(event):
        return await asyncio.to_thread(controller.handle, event)

    resumed = False

    async def tick():
        nonlocal resumed
        if not resumed:  # the first tick picks up what the registry says is live
            resumed = True
            return await asyncio.to_thread(controller.resume)
        return await asyncio.to_thread(controller.tick)

    async def build() -> ControlConsumer:
        return ControlConsumer(settings.kafka, "feedloop-swap", handle, stage="swap", tick=tick)

    _serve_until_signal(settings, "swap", build)


@main.group()
def adapters() -> None:
    """The adapter registry: list it; promote, roll back or pin an adapter by hand."""


def _sessions(settings: Settings):
    from streams.store import make_engine, make_sessionmaker

    return make_sessionmaker(make_engine(settings.store_url))


def _send_control(settings: Settings, event) -> None:
    """One control event onto the control topic (acks=all), or a ClickException saying what to check."""
    from streams import kafka
    from streams.topics import CONTROL, control_key

    async def send() -> None:
        producer = kafka.producer(settings.kafka)
        try:
            await producer.start()  # inside: a start that fails is stopped too (no unclosed producer)
            await producer.send_and_wait(CONTROL.name, event.model_dump_json().encode(), key=control_key(event))
        finally:
            await producer.stop()

    try:
        asyncio.run(send())
    except Exception as exc:
        raise click.ClickException(f"could not publish to {settings.bootstrap_servers} ({exc}); is the broker up?")


def _publish_control(settings: Settings, event) -> None:
    _send_control(settings, event)
    click.echo(f"published {event.type} {event.adapter or '(unpin)'} ({event.event_id})")


def _operator(ctx: click.Context, make_event) -> None:
    from app.adapter_commands import OperatorError

    settings = _settings(ctx)
    try:
        event = make_event(_sessions(settings))
    except OperatorError as exc:
        raise click.ClickException(str(exc)) from exc
    _publish_control(settings, event)


@adapters.command("list")
@click.pass_context
def adapters_list(ctx: click.Context) -> None:
    """Every adapter with its state, and what the router serves now."""
    from rich.console import Console
    from rich.table import Table

    from app.adapter_commands import current_routing, list_adapters

    sessions = _sessions(_settings(ctx))
    table = Table("adapter", "state", "parent", "created", "swap ms", "reason")
    for row in list_adapters(sessions):
        swap_ms = "" if row.swap_ms is None else f"{row.swap_ms:.0f}"
        table.add_row(row.name, row.state, row.parent or "base", row.created_at, swap_ms, row.reason or "")
    console = Console()
    console.print(table)
    routing = current_routing(sessions)
    if routing is None:
        console.print("router: no snapshot yet (is `feedloop learn` running?)")
    else:
        caps = ", ".join(f"{arm} ≤ {share:.0%}" for arm, share in routing.caps.items()) or "none"
        console.print(f"router arms: {', '.join(routing.arms)}; canary caps: {caps}; pinned: {routing.pinned or 'no'}")


@adapters.command("promote")
@click.argument("name")
@click.pass_context
def adapters_promote(ctx: click.Context, name: str) -> None:
    """Make NAME the champion now; the old champion is retired and unloaded after the drain."""
    from app.adapter_commands import promote

    _operator(ctx, lambda sessions: promote(sessions, name))


@adapters.command("rollback")
@click.argument("name")
@click.option("--reason", required=True, help="Recorded in the registry and the event.")
@click.pass_context
def adapters_rollback(ctx: click.Context, name: str, reason: str) -> None:
    """Take NAME out of traffic, unload it and mark it rolled back."""
    from app.adapter_commands import rollback

    _operator(ctx, lambda sessions: rollback(sessions, name, reason))


@adapters.command("pin")
@click.argument("name", required=False)
@click.option("--clear", is_flag=True, help="Lift the pin: the router decides again.")
@click.pass_context
def adapters_pin(ctx: click.Context, name: str | None, clear: bool) -> None:
    """Send all traffic to NAME (the A/B tests pause), until `pin --clear`."""
    from app.adapter_commands import pin

    if clear == (name is not None):
        raise click.UsageError("give an adapter name, or --clear")
    _operator(ctx, lambda sessions: pin(sessions, name))


# --- demo ---------------------------------------------------------------------------------


@main.command()
@click.option("--events", type=int, default=3000, show_default=True, help="Turns of the simulated population.")
@click.option("--minutes", type=float, default=14.5, show_default=True, help="Time budget of the whole run.")
@click.option("--drift-at", type=click.FloatRange(0, 1), default=None,
              help="Share of the turns after which the users' preferences shift (0: from the start, 1: never; "
                   "default: the population's, half).")  # fmt: skip
@click.option("--resume", is_flag=True,
              help="Continue the last run's store, archive, adapters and router instead of starting from nothing "
                   "in a new data/demo/<timestamp>/.")  # fmt: skip
@click.pass_context
def demo(ctx: click.Context, events: int, minutes: float, drift_at: float | None, resume: bool) -> None:
    """The whole loop on the embedded defaults with a simulated population, then a report.

    Starts broker, store, archive, gateway, vLLM, worker, learner, trainer and hot-swap
    controller; exits 0 when every target in the report is met (runs/latest/report.json)."""
    from demo.driver import run_demo
    from demo.population import PopulationConfig

    users = PopulationConfig(interactions=events, **({} if drift_at is None else {"drift_fraction": drift_at}))
    sys.exit(run_demo(_settings(ctx), users, minutes=minutes, resume=resume))


if __name__ == "__main__":  # pragma: no cover
    main()
