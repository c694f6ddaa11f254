"""Fixtures shared by the integration tests."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_settings, start_stack
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


