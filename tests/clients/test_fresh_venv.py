"""The client on its own: a fresh virtual environment with only ``pip install clients/python``
sends to a real gateway, and importing it loads no server package.

The environment is built once per test session (pip from the configured index, as an app
would install it), from a copy of the client's source so the checkout stays clean.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from feedloop_client import new_id
from streams.topics import EVENTS
from tests.conftest import API_KEYS, wait_until_archived

CLIENT_SOURCE = Path(__file__).parents[2] / "clients" / "python"
SERVER_PACKAGES = ("fastapi", "aiokafka", "sqlalchemy", "river", "numpy", "torch", "faust", "pydantic", "openai")


@pytest.fixture(scope="session")
def client_python(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("client-venv")
    source = shutil.copytree(CLIENT_SOURCE, root / "source", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "venv", root / "venv"], check=True, timeout=60)
    python = root / "venv" / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", source],
                   check=True, timeout=120)  # fmt: skip
    return python


SEND = textwrap.dedent("""
    import sys
    from feedloop_client import FeedloopClient

    base_url, key, interaction_id = sys.argv[1:]
    client = FeedloopClient(base_url, api_key=key, app_id="app-a")
    turn = client.interaction(interaction_id=interaction_id, user_id="u", session_id="s", adapter="base",
                              prompt=[{"role": "user", "content": "hi"}], response="hello")
    client.log(turn, client.feedback(turn, "thumbs", value=1))
    # no close(): the interpreter's exit must send them
""")


async def test_a_client_only_environment_sends_events_that_are_archived(stack, client_python):
    interaction_id = f"fresh-{new_id()}"
    process = await asyncio.create_subprocess_exec(
        str(client_python), "-c", SEND, stack.base_url, API_KEYS["app-a"], interaction_id,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, output.decode()
    archived = await wait_until_archived(stack, EVENTS.name, 2,
                                         where=lambda r: json.loads(r.value)["interaction_id"] == interaction_id)  # fmt: skip
    assert sorted(json.loads(r.value)["type"] for r in archived) == ["feedback", "interaction"]


def test_importing_the_client_loads_no_server_package(client_python):
    done = subprocess.run([client_python, "-X", "importtime", "-c", "import feedloop_client"],
                          capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
    loaded = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert "httpx" in loaded  # the report is read right
    assert not loaded & set(SERVER_PACKAGES)
