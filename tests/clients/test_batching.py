"""Background batching against the real gateway: what was logged is archived once the client
is closed, in batches of the configured size; what cannot be sent is reported, not dropped."""

from __future__ import annotations

import json
import socket

import pytest

from feedloop_client import AsyncFeedloopClient, BatchPolicy, FeedloopClient, QueueFull, RetryPolicy
from streams.topics import EVENTS
from tests.clients.recording import AsyncRecordingTransport, Recording
from tests.conftest import API_KEYS, wait_until_archived


def turns(client, count):
    return [client.interaction(user_id="u", session_id=f"s-{i}", adapter="base",
                               prompt=[{"role": "user", "content": "hi"}], response="hello")
            for i in range(count)]  # fmt: skip


def ids_in(events):
    ids = {e["event_id"] for e in events}
    return lambda record: json.loads(record.value)["event_id"] in ids


async def test_async_events_queued_then_closed_are_all_archived_in_batches(stack):
    recording = Recording()
    # A time bound far beyond the test: only the size bound and the close can send them.
    batch = BatchPolicy(max_events=4, max_wait_s=3600)
    async with AsyncFeedloopClient(stack.base_url, api_key=API_KEYS["app-a"], app_id="app-a", batch=batch,
                                   transport=AsyncRecordingTransport(recording)) as client:  # fmt: skip
        events = turns(client, 5)
        events += [client.feedback(t, "score", name="helpfulness", value=0.5, comment="ok") for t in events]
        await client.log(*events)
    assert recording.statuses == [202, 202, 202]  # 4 + 4 by size, the last 2 on close
    assert (client.delivery.sent, client.delivery.failed, client.delivery.rejected) == (10, 0, 0)
    archived = await wait_until_archived(stack, EVENTS.name, len(events), where=ids_in(events))
    assert len(archived) == len(events)


async def test_sync_batches_go_on_the_time_bound(stack):
    with FeedloopClient(stack.base_url, api_key=API_KEYS["app-a"], app_id="app-a",
                        batch=BatchPolicy(max_events=1000, max_wait_s=0.2)) as client:  # fmt: skip
        events = turns(client, 3)
        client.log(*events)
        archived = await wait_until_archived(stack, EVENTS.name, 3, where=ids_in(events))
        assert len(archived) == 3, "sent within the time bound, before any close"
    client.flush()  # after close: nothing left to wait for, and no sender to wait on


async def test_a_batch_that_cannot_be_sent_is_counted_and_handed_to_on_failure():
    failures = []
    async with AsyncFeedloopClient("http://127.0.0.1:9", api_key="k", app_id="app-a",
                                   retry=RetryPolicy(attempts=2, base_delay_s=0.01),
                                   on_failure=lambda events, error: failures.append((events, error))) as client:  # fmt: skip
        events = turns(client, 2)
        await client.log(*events)
    assert client.delivery.failed == 2
    assert [e for batch, _ in failures for e in batch] == events


def test_a_full_queue_refuses_the_event_to_the_caller_rather_than_dropping_it():
    # A server that takes connections and never answers: the sender is stuck on its first batch.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        client = FeedloopClient(url, api_key="k", app_id="app-a", timeout_s=1.0, retry=RetryPolicy(attempts=1),
                                batch=BatchPolicy(max_events=1, max_queue=1, put_timeout_s=0.05))  # fmt: skip
        first, second, third = turns(client, 3)
        client.log(first, second)  # one being sent, one waiting in the queue
        with pytest.raises(QueueFull):
            client.log(third)
        client.close()
    assert (client.delivery.sent, client.delivery.failed) == (0, 2)


def test_what_is_not_an_event_dict_is_refused_when_logged_not_lost_later():
    with FeedloopClient("http://127.0.0.1:9", api_key="k", app_id="app-a") as client:
        with pytest.raises(TypeError, match="dicts"):
            client.log(("interaction", "hi"))
    assert (client.delivery.sent, client.delivery.failed) == (0, 0)
