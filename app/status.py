"""`feedloop status`: the dashboard's essentials as rich tables in the terminal.

Text that came from the log (dead-letter reasons and details, drift signals) is escaped: rich
reads square brackets as markup, and a rejected event's own text ends up in its detail.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from app.liveness import STARTING, UP
from app.overview import Overview, Series

RECENT_ROWS = 5


def _number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _latest(series: Series) -> dict[str, float | None]:
    """Each name's newest value: the last bucket in which it has one."""
    latest: dict[str, float | None] = {}
    for name, values in series.values.items():
        latest[name] = next((v for v in reversed(values) if v is not None), None)
    return latest


def _print(console: Console, table: Table) -> None:
    """A table, or one dim line when it has no rows: an idle loop should not print empty boxes."""
    if table.row_count:
        console.print(table)
    else:
        console.print(f"[dim]{table.title}: none yet[/dim]")


def _doing(detail: dict) -> str:
    """A heartbeat's detail in words: ``partitions feedloop.events.v1 0,2``, ``training b-7``."""
    def plain(value) -> str:
        if isinstance(value, dict):
            return "; ".join(f"{k} {plain(v)}" for k, v in sorted(value.items()))
        if isinstance(value, list):
            return ",".join(map(str, value))
        return str(value)

    return ", ".join(f"{k} {plain(v)}" for k, v in sorted(detail.items()))


def render_status(overview: Overview, console: Console) -> None:
    summary = Table(title=f"feedloop at {overview.generated_at} UTC", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    accepted = overview.events_accepted
    summary.add_row("events accepted", f"{sum(accepted.values())} ({', '.join(f'{k} {v}' for k, v in accepted.items())})")
    summary.add_row("dead letters", str(sum(overview.dead_letters.values())))
    summary.add_row("undecodable records", str(overview.undecodable))
    summary.add_row("examples", str(overview.examples))
    summary.add_row("champion", overview.champion)
    summary.add_row("challengers", ", ".join(overview.challengers) or "none")
    summary.add_row("router snapshot", "none" if overview.router is None else
                    f"version {overview.router.version}, {overview.router.examples} examples, arms {', '.join(overview.router.arms)}")
    summary.add_row("archive", ", ".join([f"{overview.segments} segments"] + [
        f"{topic} {n}" for topic, n in sorted(overview.records_by_topic.items())]))
    privacy = overview.privacy
    summary.add_row("privacy budget", f"epsilon {privacy.spent_epsilon:.2f} of {privacy.budget_epsilon:.2f} spent"
                    + ("" if privacy.enabled else " (DP training off)"))
    console.print(summary)

    processes = Table(title="processes (heartbeats; down = stopped, or silent past FEEDLOOP_LIVENESS__DOWN_AFTER_S)")
    for column in ("process", "instance", "state", "last beat", "started", "doing"):
        processes.add_column(column)
    for p in overview.processes:
        state = f"[{ {UP: 'green', STARTING: 'yellow'}.get(p.state, 'red') }]{p.state}[/]"
        doing = p.why if p.state != UP else _doing(p.detail)
        processes.add_row(p.process, escape(f"{p.host}:{p.pid}"), state, f"{p.beat_age_s:.0f} s ago", p.started_at,
                          escape(doing))
    _print(console, processes)

    traffic, reward = _latest(overview.traffic_share), _latest(overview.reward_mean)
    adapters = Table(title="adapters")
    for column in ("adapter", "state", "parent", "traffic share", "reward", "swap ms", "last event", "reason"):
        adapters.add_column(column)
    for a in overview.adapters:
        last = a.events[-1] if a.events else None
        adapters.add_row(a.name, a.state, a.parent or "", _number(traffic.get(a.name), 2), _number(reward.get(a.name)),
                         _number(a.swap_ms, 1), f"{last.kind} {last.at}" if last else "", a.reason or "")
    _print(console, adapters)

    tests = Table(title="A/B tests (lift = challenger - champion mean reward; bounds: confidence sequence)")
    for column in ("challenger", "champion", "status", "n", "lift", "lower", "upper"):
        tests.add_column(column)
    for x in overview.experiments:
        tests.add_row(x.challenger, x.champion, x.status, f"{x.n_challenger} / {x.n_champion}", _number(x.lift),
                      _number(x.lower), _number(x.upper))
    _print(console, tests)

    letters = Table(title="dead letters by reason")
    letters.add_column("reason")
    letters.add_column("count", justify="right")
    letters.add_column("latest detail")
    latest_detail = {}
    for d in reversed(overview.recent_dead_letters):
        latest_detail[d["reason"]] = d.get("detail") or ""
    for reason, count in overview.dead_letters.items():
        letters.add_row(escape(str(reason)), str(count), escape(str(latest_detail.get(reason, "") or "")[:80]))
    _print(console, letters)

    batches = Table(title="batches: " + (", ".join(f"{s} {n}" for s, n in sorted(overview.batches_by_status.items()))
                                         or "none"))
    for column in ("batch", "size", "status", "trigger", "strata", "channel weights"):
        batches.add_column(column)
    for b in overview.recent_batches[-RECENT_ROWS:]:
        batches.add_row(b.batch_id, str(b.size), b.status, b.trigger, str(len(b.strata)),
                        ", ".join(f"{c} {w:.2f}" for c, w in sorted(b.loss_weights.items())))
    _print(console, batches)

    if overview.failed_batches:
        failed = Table(title="failed batches (fix the cause, then `feedloop train --retry BATCH`)")
        for column in ("batch", "size", "created", "reason"):
            failed.add_column(column)
        for b in overview.failed_batches:
            failed.add_row(b.batch_id, str(b.size), b.created_at or "", escape(b.reason or "(no reason recorded)"))
        console.print(failed)

    if overview.retrain:
        retrain = Table(title="adapters to retrain (trained on the data of users erased since: docs/privacy.md)")
        for column in ("adapter", "state", "erasures", "apps", "first erased"):
            retrain.add_column(column)
        for r in overview.retrain:
            retrain.add_row(r.adapter, r.state or "(not in the registry)", str(r.erasures), ", ".join(r.apps),
                            r.first_erased_at or "")
        console.print(retrain)

    drift = Table(title="drift alarms by signal")
    drift.add_column("signal")
    drift.add_column("alarms", justify="right")
    for signal, count in overview.drift_alarms.items():
        drift.add_row(escape(str(signal)), str(count))
    _print(console, drift)

    lag = Table(title="pipeline lag (archived offset - checkpointed offset)")
    for column in ("consumer", "partition", "archived", "checkpointed", "lag"):
        lag.add_column(column)
    for row in overview.lag:
        lag.add_row(row.consumer, str(row.partition), str(row.archived_offset), str(row.checkpointed_offset), str(row.lag))
    _print(console, lag)
