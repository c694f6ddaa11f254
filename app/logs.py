"""Structured logging: JSON lines for machines, a readable console on a terminal.

Bind request- or event-scoped fields with ``structlog.contextvars.bound_contextvars(event_id=...)``
and every log line inside carries them. Library loggers (uvicorn, aiokafka, alembic) go
through the same renderer.
"""

from __future__ import annotations

import logging
import sys

import structlog

_SHARED_PROCESSORS: list = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Route structlog and stdlib logging to stderr in one format."""
    pretty = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer = (
        structlog.dev.ConsoleRenderer()
        if pretty
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
