"""feedloop's own processes, started beside one another with the same settings (the demo).

``settings_env`` turns a ``Settings`` into the ``FEEDLOOP_*`` variables that rebuild it, so a
child process (`feedloop worker`, `learn`, `train`, `swap`) sees exactly the parent's
configuration, secrets included. ``Child`` runs one such command in its own process group
with its output in a log file (a pipe nobody reads would block it), and stops it with
SIGTERM, then SIGKILL, so Ctrl-C never leaves a worker behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import structlog
from pydantic import BaseModel, SecretStr

from app.settings import Settings, env_name

log = structlog.get_logger(__name__)


def _plain(value):
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, BaseModel):  # a reviewer's key, in a dict of them
        return _plain(value.model_dump())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def settings_env(settings: Settings) -> dict[str, str]:
    """FEEDLOOP_* variables that rebuild ``settings`` in another process."""
    env = {}
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        if value is None:
            continue
        if hasattr(value, "model_dump"):
            value = value.model_dump()  # not mode="json": that would mask the secrets
        value = _plain(value)
        env[env_name(name, field)] = value if isinstance(value, str) else json.dumps(value)
    return env


class Child:
    """One `feedloop <command>` process."""

    def __init__(self, command: list[str], settings: Settings, log_path: Path, env: dict[str, str] | None = None):
        self.command = command
        self.log_path = log_path
        self.env = {**os.environ, **settings_env(settings), **(env or {})}
        self.process: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return " ".join(self.command)

    def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "app.cli", *self.command], env=self.env,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        log.info("process.started", command=self.name, pid=self.process.pid, log=str(self.log_path))
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_s: float = 30.0) -> int | None:
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            _signal(process.pid, signal.SIGTERM)
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("process.killed", command=self.name, after_s=grace_s)
                _signal(process.pid, signal.SIGKILL)
                process.wait(10)
        return process.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _signal(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
