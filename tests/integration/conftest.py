"""Fixtures shared by the integration tests."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from tests.conftest import POSTGRES_ADMIN_URL, make_settings, start_stack
from tests.integration.fake_vllm import FakeVllm


@pytest.fixture
async def gateway(tmp_path, broker):
    """The stack in front of :class:`FakeVllm`; app-a may name adapters, app-b may not."""
    model_dir = tmp_path / "base"
    model_dir.mkdir()
    (model_dir / "feedloop_model.json").write_text(json.dumps({"weights_sha256": "0" * 64}))
    async with FakeVllm() as vllm:
        settings = make_settings(tmp_path, broker.port, vllm_urls=[vllm.url], base_model_path=model_dir,
                                 adapter_choice={"app-a": ["*"]})  # fmt: skip
        stack, stop = await start_stack(settings)
        try:
            yield stack, vllm
        finally:
            await stop()


@pytest.fixture
def database_url():
    """A PostgreSQL database of this test's own, for processes that count every row (learners)."""
    name = f"feedloop_own_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
