"""The archive's sealed segments, each read once, in the order sealed: what the views fold.

Segments are immutable once sealed, so a reader that remembers which ones it folded reads
only the new ones on each call. The overview (``app.overview``) and the review desk
(``app.review_desk``) both follow the archive this way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from streams.archive import ArchivedRecord, read_segment
from streams.store import ArchiveSegment

log = structlog.get_logger(__name__)


class SealedSegments:
    """Hands every record of the segments sealed since the last call to ``fold``; calls
    ``reset`` first when the folded segments are gone (a new store): start the fold again."""

    def __init__(self, sessions: sessionmaker, archive_dir: Path, topics: frozenset[str] | None = None) -> None:
        self.sessions = sessions
        self.archive_dir = archive_dir
        self.topics = topics  # None: every topic
        self._folded: set[int] = set()  # ids of the segments in the fold
        self.segments_read = 0  # files read since start: tests check the cache

    @property
    def folded(self) -> int:
        """How many segments the fold has seen (skipped topics included)."""
        return len(self._folded)

    def catch_up(self, fold: Callable[[ArchivedRecord], None], reset: Callable[[], None]) -> None:
        """Fold the segments sealed since the last call, oldest first."""
        with self.sessions() as session:
            newest = max(self._folded, default=0)
            total = session.scalar(select(func.count()).select_from(ArchiveSegment))
            newer = session.scalar(select(func.count()).where(ArchiveSegment.id > newest))
            query = select(ArchiveSegment.id, ArchiveSegment.path, ArchiveSegment.topic).order_by(ArchiveSegment.id)
            if total != len(self._folded) + newer:
                # Segments disappeared (a new store) or one was committed out of id order: diff all ids.
                ids = set(session.scalars(select(ArchiveSegment.id)))
                if not self._folded <= ids:
                    log.info("archive_fold.reset", folded=len(self._folded), segments=len(ids))
                    reset()
                    self._folded = set()
                pending = list(session.execute(query.where(ArchiveSegment.id.in_(ids - self._folded))))
            else:
                pending = list(session.execute(query.where(ArchiveSegment.id > newest)))
        for segment_id, path, topic in pending:
            self._folded.add(segment_id)
            if self.topics is not None and topic not in self.topics:
                continue
            try:
                for record in read_segment(self.archive_dir / path):
                    fold(record)
            except OSError as error:
                # A missing file is `feedloop archive verify`'s to report; skip it, do not retry forever.
                log.warning("archive_fold.segment_unreadable", path=path, error=str(error))
            self.segments_read += 1
