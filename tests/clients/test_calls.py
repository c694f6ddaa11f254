"""route and erase through the real gateway, from the async client."""

from __future__ import annotations

from feedloop_client import AsyncFeedloopClient
from streams.pseudonyms import Pseudonymizer, user_identity
from tests.conftest import API_KEYS


async def test_the_async_client_routes_and_erases_a_user_with_an_odd_id(stack):
    user = "user@odd+chars=1"  # characters the contract's ids allow, percent-encoded on the way
    async with AsyncFeedloopClient(stack.base_url, api_key=API_KEYS["app-a"], app_id="app-a") as client:
        answer = await client.route({"domain": "code"})
        erased = await client.erase(user)
        again = await client.erase(user)
    assert answer.adapter in answer.probabilities and answer.propensity == answer.probabilities[answer.adapter]
    assert (erased.app_id, erased.user_id, erased.retrain_adapters, erased.already_erased) == ("app-a", user, [], False)
    assert (again.erased_at, again.already_erased) == (erased.erased_at, True)
    assert Pseudonymizer(stack.settings.key_store()).erased_at(user_identity("app-a", user)) is not None
