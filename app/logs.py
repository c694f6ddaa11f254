"""Structured logging: JSON lines for machines, a readable console on a terminal.

Bind request- or event-scoped fields with ``structlog.contextvars.bound_contextvars(event_id=...)``
and every log line inside carries them. Library loggers (uvicorn, aiokafka, alembic) go
through the same renderer.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

# FEEDLOOP_LOG_LEVEL and FEEDLOOP_LOG_FORMAT (app.settings) take these.
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]

_SHARED_PROCESSORS: list = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


def renders_console(fmt: LogFormat, stream: TextIO) -> bool:
    """Readable lines for a person at a terminal; JSON lines for files, pipes and collectors,
    which a colour code or a multi-line traceback would break. 'json' and 'console' force it."""
    return fmt == "console" or (fmt == "auto" and stream.isatty())


def configure_logging(level: LogLevel = "info", fmt: LogFormat = "auto") -> None:
    """Route structlog and stdlib logging to stderr in one format."""
    renderer = (
        structlog.dev.ConsoleRenderer()
        if renders_console(fmt, sys.stderr)
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[*_SHARED_PROCESSORS, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_SHARED_PROCESSORS,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # These log every connection retry, request, service start or (alembic) plugin set up on
    # import, or (matplotlib) its font cache built on first use at INFO; keep them to warnings.
    for noisy in ("aiokafka", "httpx", "httpcore", "faust", "mode", "alembic.runtime.plugins",
                   "matplotlib.font_manager"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
