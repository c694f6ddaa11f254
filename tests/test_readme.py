"""The README's examples run as written, on a fresh data dir, against a real broker and gateway.

Every ```bash and ```python block of README.md runs, in the order of the README, as one bash
script (a python block through the interpreter running the tests), unless the line before it
is an HTML comment starting ``<!-- not run:`` that says why (the 15-minute demo, commands
that run until Ctrl-C). Other fences (plain ```, diagrams) are text. Three substitutions
keep the examples runnable here without changing what they do: ``.venv/bin/feedloop`` and
``.venv/bin/python`` become this interpreter (a fresh clone's ``make`` builds ``.venv``),
and port 8080 becomes a free port (other test runs share the machine), with the embedded
broker on a free port too. A background process the examples start (`feedloop up &`) is
stopped with SIGTERM at the end, as `kill %1` would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```(?P<lang>bash|python)\n(?P<body>.*?)\n```", re.DOTALL)
NOT_RUN = "<!-- not run:"


def runnable_blocks(markdown: str) -> list[tuple[str, str]]:
    """(language, body) of every bash/python block not marked ``<!-- not run: ... -->``."""
    return [(m["lang"], m["body"]) for m in BLOCK.finditer(markdown) if not m["before"].startswith(NOT_RUN)]


def script(blocks: list[tuple[str, str]], python: str, gateway_port: int) -> str:
    parts = ["set -euo pipefail"]
    for lang, body in blocks:
        parts.append(body if lang == "bash" else f"{python} - <<'PYTHON'\n{body}\nPYTHON")
    commands = {"feedloop": f"{python} -m app.cli", "python": python}
    text = re.sub(r"(?<![\w/.])\.venv/bin/(feedloop|python)\b", lambda m: commands[m[1]], "\n".join(parts))
    return text.replace(":8080", f":{gateway_port}")


def test_marked_blocks_are_left_out_and_the_rest_kept_in_order():
    markdown = ("<!-- not run: slow -->\n```bash\nmake run\n```\n\n```python\nprint(1)\n```\n"
                "```\ndiagram\n```\ntext\n```bash\necho 2\n```\n")  # fmt: skip
    assert runnable_blocks(markdown) == [("python", "print(1)"), ("bash", "echo 2")]
    written = script([("bash", ".venv/bin/feedloop up & curl localhost:8080/x")], "/v/.venv/bin/python", 9)
    assert written.endswith("/v/.venv/bin/python -m app.cli up & curl localhost:9/x")


def test_the_readme_examples_run_as_written(tmp_path):
    blocks = runnable_blocks((ROOT / "README.md").read_text())
    assert any("feedloop up &" in body for _, body in blocks) and any(lang == "python" for lang, _ in blocks)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDLOOP_")}
    gateway_port = free_port()
    env |= {"PYTHONPATH": str(ROOT), "FEEDLOOP_EMBEDDED_BROKER_PORT": str(free_port()),
            "FEEDLOOP_GATEWAY_PORT": str(gateway_port), "FEEDLOOP_LOG_FORMAT": "json"}  # fmt: skip
    (tmp_path / "examples.sh").write_text(script(blocks, sys.executable, gateway_port))
    # Files, not pipes: the background process keeps its output open after the script ends.
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        shell = subprocess.Popen(["bash", "examples.sh"], cwd=tmp_path, env=env, stdout=out, stderr=err,
                                 start_new_session=True)  # fmt: skip
        try:
            shell.wait(timeout=90)
            # `feedloop up` goes on in the background: its archiver seals the examples' events within its
            # flush interval (it may have joined its group after they were sent).
            deadline = time.monotonic() + 60
            while not _archived(tmp_path) and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            stopped = _stop_group(shell.pid)
    out, err = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert shell.returncode == 0, f"{out}\n{err[-3000:]}"
    assert "1 0 []" in out  # the Python client's rating sent at once (its batched events: tests/clients)
    assert '"accepted":1' in out  # curl's feedback
    assert stopped, "the background `feedloop up` did not stop on SIGTERM"
    (worker,) = [json.loads(line)["pid"] for line in err.splitlines() if '"process.started"' in line]
    assert not _alive(worker), "`feedloop up` left its worker running"  # its own session: not in the group
    assert (tmp_path / "data" / "feedloop.db").exists() and _archived(tmp_path)


def _archived(tmp_path) -> list:
    return [path for path in (tmp_path / "data" / "archive").rglob("*") if path.is_file()]


def _stop_group(pgid: int, timeout_s: float = 40.0) -> bool:
    """SIGTERM to what the script left running; True once all of it has exited."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.killpg(pgid, signal.SIGKILL)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
