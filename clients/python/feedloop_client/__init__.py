"""feedloop's light client: log interactions and feedback, route, erase; httpx is its only dependency.

>>> from feedloop_client import FeedloopClient
>>> with FeedloopClient("http://127.0.0.1:8080", api_key="s3cret", app_id="chat-web") as client:  # doctest: +SKIP
...     turn = client.interaction(user_id="u1", session_id="s1", adapter="base",
...                               prompt=[{"role": "user", "content": "hi"}], response="hello")
...     client.log(turn, client.feedback(turn, "thumbs", value=1))  # sent in the background

See clients/python/README.md.
"""

from typing import TYPE_CHECKING, Any

from feedloop_client.batching import Delivery
from feedloop_client.config import BatchPolicy, RetryPolicy
from feedloop_client.errors import FeedloopError, QueueFull
from feedloop_client.events import Event, annotation, feedback, interaction, new_id
from feedloop_client.openai_compat import FeedloopIds, feedloop_ids, wrap_openai
from feedloop_client.results import Erasure, IngestResult, RejectedEvent, RouteAnswer
from feedloop_client.sync_client import FeedloopClient

if TYPE_CHECKING:
    from feedloop_client.async_client import AsyncFeedloopClient


def __getattr__(name: str) -> Any:
    # asyncio costs as much to import as httpx: a sync app should not pay for it.
    if name == "AsyncFeedloopClient":
        from feedloop_client.async_client import AsyncFeedloopClient

        return AsyncFeedloopClient
    raise AttributeError(f"module 'feedloop_client' has no attribute {name!r}")


__all__ = [
    "AsyncFeedloopClient", "BatchPolicy", "Delivery", "Erasure", "Event", "FeedloopClient", "FeedloopError",
    "FeedloopIds", "IngestResult", "QueueFull", "RejectedEvent", "RetryPolicy", "RouteAnswer", "annotation",
    "feedback", "feedloop_ids", "interaction", "new_id", "wrap_openai",
]
