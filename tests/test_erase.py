"""The gateway's erase when the broker does not acknowledge its user_erased: 503 with what to
do, the user erased all the same, and the same request again announces it once."""

import httpx

import migrations
from app.gateway import create_app
from app.publisher import PublishError
from streams.pseudonyms import Pseudonymizer, user_identity
from streams.store import Erasure, make_engine, make_sessionmaker
from tests.conftest import API_KEYS, make_settings


class Broker:
    """A publisher whose control events are acknowledged only once ``up``."""

    def __init__(self) -> None:
        self.up, self.sent = False, []

    async def publish_control(self, event) -> None:
        if not self.up:
            raise PublishError("the broker did not acknowledge the user_erased event within 3s; send the request again")
        self.sent.append(event)


async def test_an_erasure_the_broker_missed_is_announced_by_the_same_request_again(tmp_path):
    settings = make_settings(tmp_path, 1)
    migrations.upgrade(settings.store_url)
    keys = Pseudonymizer(settings.key_store())
    pseudonym = keys.pseudonym(user_identity("app-a", "u-1"))
    broker = Broker()
    app = create_app(settings, publisher=broker)
    headers = {"Authorization": f"Bearer {API_KEYS['app-a']}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
        missed = await http.post("/v1/users/u-1/erase", headers=headers)
        assert missed.status_code == 503 and missed.json()["reason"] == "not_announced"
        assert "erased" in missed.json()["detail"] and "again" in missed.json()["detail"]
        assert Pseudonymizer(settings.key_store()).is_erased(user_identity("app-a", "u-1"))
        broker.up = True
        answers = [await http.post("/v1/users/u-1/erase", headers=headers) for _ in range(2)]
    assert [a.status_code for a in answers] == [202, 202] and answers[0].json() == answers[1].json()
    assert answers[0].json()["already_erased"] and answers[0].json()["retrain_adapters"] == []
    assert [(e.type, e.pseudonym) for e in broker.sent] == [("user_erased", pseudonym)], "announced once"
    engine = make_engine(settings.store_url)
    try:
        with make_sessionmaker(engine)() as session:
            assert session.get(Erasure, pseudonym).announced
    finally:
        engine.dispose()
