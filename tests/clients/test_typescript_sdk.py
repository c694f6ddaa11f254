"""The TypeScript SDK (clients/typescript) against a real gateway.

`npm test` there checks its generated types against schemas/v1, compiles it, and runs its
Node tests; those that need a gateway get this one through FEEDLOOP_URL, FEEDLOOP_KEY,
FEEDLOOP_APP, FEEDLOOP_SESSION and a rate-limited app's FEEDLOOP_LIMITED_KEY and _APP. This test then checks the archive for what they sent, so
a client that got a 202 for events the gateway never kept would still fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from streams.topics import EVENTS
from tests.conftest import API_KEYS, make_settings, start_stack, wait_until_archived

CLIENT = Path(__file__).parents[2] / "clients" / "typescript"
# Written after a successful `npm ci`; the Makefile's install step writes the same stamp.
STAMP = CLIENT / "node_modules" / ".installed"
APP = "app-a"
LIMITED = "app-b"  # one request a second: the Node tests see a real 429 and its Retry-After


def npm() -> str:
    found = shutil.which("npm")
    if found is None:
        pytest.fail("npm is not installed: the TypeScript SDK's tests need Node 20+ and npm")
    return found


def ensure_installed() -> None:
    """`npm ci` unless node_modules was installed from the current package-lock.json."""
    lock = CLIENT / "package-lock.json"
    if STAMP.exists() and STAMP.stat().st_mtime >= lock.stat().st_mtime:
        return
    done = subprocess.run([npm(), "ci", "--no-audit", "--no-fund"], cwd=CLIENT, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"`npm ci` failed in {CLIENT} (it needs the npm registry); run "
                    f"`cd clients/typescript && npm ci` by hand:\n{done.stdout}{done.stderr}")  # fmt: skip
    STAMP.touch()


@pytest.mark.timeout(300)
async def test_the_typescript_client_sends_an_interaction_and_its_thumbs(tmp_path, broker):
    ensure_installed()
    session = f"ts-{uuid.uuid4().hex}"
    limits = {LIMITED: {"requests_per_s": 1, "burst": 1}}
    stack, stop = await start_stack(make_settings(tmp_path, broker.port, rate_limits=limits))
    try:
        env = {**os.environ, "FEEDLOOP_URL": stack.base_url, "FEEDLOOP_KEY": API_KEYS[APP],
               "FEEDLOOP_APP": APP, "FEEDLOOP_SESSION": session,
               "FEEDLOOP_LIMITED_KEY": API_KEYS[LIMITED], "FEEDLOOP_LIMITED_APP": LIMITED}  # fmt: skip
        # Not subprocess.run: the gateway answering the Node tests runs on this event loop.
        run = await asyncio.create_subprocess_exec(npm(), "test", cwd=CLIENT, env=env,
                                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        output = (await run.communicate())[0].decode()
        assert run.returncode == 0, output
        assert "# skipped 0" in output, "the gateway tests were skipped:\n" + output
        records = await wait_until_archived(
            stack, EVENTS.name, 2, where=lambda r: json.loads(r.value).get("session_id") == session
        )
    finally:
        await stop()
    events = {event["type"]: event for event in (json.loads(r.value) for r in records)}
    assert len(records) == 2, records
    interaction, thumbs = events["interaction"], events["feedback"]
    assert (interaction["app_id"], interaction["adapter"], interaction["context"]["client"]) == (APP, "base", "typescript")
    assert (thumbs["kind"], thumbs["value"], thumbs["interaction_id"]) == ("thumbs", 1, interaction["interaction_id"])
