"""Erasure end to end on the real broker: the gateway's answer names the adapters trained on
the user, its one ``user_erased`` reaches the archive, and the trainer worker re-cuts the batch
it has not trained; erasing again answers the same and announces nothing more; an app's
erasures are rate-limited like its other requests."""

import json

import httpx

from app.rate_limit import RateLimit
from streams.contract import UserErased
from streams.pseudonyms import Pseudonymizer, user_identity
from streams.store import Batch, Erasure
from streams.topics import CONTROL
from streams.training_data import read_batch
from tests.conftest import API_KEYS, make_settings, start_stack, wait_until_archived
from tests.trainer.test_erasure import adapter, batch, sft
from tests.trainer.test_worker import new_worker, run_until

A = {"Authorization": f"Bearer {API_KEYS['app-a']}"}


def user_erased(records) -> list[UserErased]:
    return [UserErased.model_validate_json(r.value) for r in records if json.loads(r.value)["type"] == "user_erased"]


async def test_erase_through_the_gateway_reaches_the_trainer_once_and_answers_the_same_again(tmp_path, own_broker):
    limits = {"app-a": RateLimit(requests_per_s=0.001, burst=3)}
    running, stop = await start_stack(make_settings(tmp_path, own_broker.port, rate_limits=limits))
    settings, sessions = running.settings, running.sessions
    try:
        keys = Pseudonymizer(settings.key_store())
        gone, stays, later = (keys.pseudonym(user_identity("app-a", u)) for u in ("gone", "stays", "later"))
        adapter(sessions, "adapter-1")
        adapter(sessions, "adapter-2")
        batch(sessions, settings.data_dir, "batch-1", {gone: [sft("g1", "gone")]}, status="trained",
              adapter="adapter-1")
        batch(sessions, settings.data_dir, "batch-2", {stays: [sft("s2", "stays")]}, status="trained",
              adapter="adapter-2")
        waiting = batch(sessions, settings.data_dir, "batch-3", {gone: [sft("g3", "gone")], stays: [sft("s3", "x")]})

        async with httpx.AsyncClient(base_url=running.base_url) as http:
            first = await http.post("/v1/users/gone/erase", headers=A)
            assert first.status_code == 202, first.text
            assert first.json()["retrain_adapters"] == ["adapter-1"] and not first.json()["already_erased"]
            again = await http.post("/v1/users/gone/erase", headers=A)
            assert again.status_code == 202 and again.json() == {**first.json(), "already_erased": True}
            # A later erasure's event is archived after any the repeat could have sent (one partition).
            assert (await http.post("/v1/users/later/erase", headers=A)).status_code == 202
            limited = await http.post("/v1/users/gone/erase", headers=A)
            assert limited.status_code == 429 and limited.json()["reason"] == "rate_limited"

        archived = user_erased(await wait_until_archived(running, CONTROL.name, 2))
        assert [(e.pseudonym, e.app_id) for e in archived] == [(gone, "app-a"), (later, "app-a")]
        assert all("gone" not in e.model_dump_json() and "later" not in e.model_dump_json() for e in archived)

        def recut() -> bool:
            with sessions() as session:
                return all(session.get(Erasure, p).applied_at is not None for p in (gone, later))

        worker = new_worker(settings, sessions, "feedloop-trainer-erasure")
        assert await run_until(worker, recut, timeout_s=60) is None
        assert recut(), "the trainer applied both erasures"
        manifest, records = read_batch(waiting)
        assert manifest.users.keys() == {stays} and [r.example_id for r in records["sft"]] == ["s3:accepted"]
        with sessions() as session:
            assert session.get(Batch, "batch-3").example_count == 1
            assert session.get(Erasure, gone).recut_batches == ["batch-3"]
            assert session.get(Erasure, later).adapters == []
    finally:
        await stop()
