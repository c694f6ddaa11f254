"""A trainer stand-in for tests/trainer/test_lock.py: takes the trainer's lock, holds it until
told to let go, as a process of its own with a local directory of its own (another host).

    python -m tests.trainer.lock_holder <database url> <local dir>

Writes ``<local dir>/acquired`` (its pid) once it holds the lock, releases it when
``<local dir>/release`` appears, then writes ``<local dir>/released`` and exits. It logs
(JSON lines) to stderr, where the tests look for ``trainer.lock_waiting``.
"""

import os
import sys
import time
from pathlib import Path

from app.logs import configure_logging
from streams.store import make_engine
from trainer.lock import TrainerLock


def main(url: str, local: Path) -> None:
    configure_logging("info", "json")
    engine = make_engine(url)
    with TrainerLock(engine, local, poll_s=0.05):
        (local / "acquired").write_text(str(os.getpid()))
        while not (local / "release").exists():
            time.sleep(0.02)
    (local / "released").write_text(str(os.getpid()))
    engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
