"""The archive's sealed segments, each read once, in the order sealed: what the views fold.

Segments are immutable once sealed, so a reader that remembers which ones it folded reads
only the new ones on each call. The overview (``app.overview``) and the review desk
(``app.review_desk``) both follow the archive this way.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from streams.archive import ArchivedRecord, SegmentUnreadable, read_segment
from streams.objects import ObjectStore
from streams.store import ArchiveSegment

log = structlog.get_logger(__name__)


class SealedSegments:
    """Hands every record of the segments sealed since the last call to ``fold``; calls
    ``reset`` first when the folded segments are gone (a new store): start the fold again."""

    def __init__(self, sessions: sessionmaker, objects: ObjectStore, topics: frozenset[str] | None = None) -> None:
        self.sessions = sessions
        self.objects = objects
        self.topics = topics  # None: every topic
        self._folded: set[int] = set()  # ids of the segments in the fold
        self.segments_read = 0  # segments read since start: tests check the cache

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
            query = select(ArchiveSegment).order_by(ArchiveSegment.id)
            if total != len(self._folded) + newer:
                # Segments disappeared (a new store) or one was committed out of id order: diff all ids.
                ids = set(session.scalars(select(ArchiveSegment.id)))
                if not self._folded <= ids:
                    log.info("archive_fold.reset", folded=len(self._folded), segments=len(ids))
                    reset()
                    self._folded = set()
                pending = list(session.scalars(query.where(ArchiveSegment.id.in_(ids - self._folded))))
            else:
                pending = list(session.scalars(query.where(ArchiveSegment.id > newest)))
        for segment in pending:
            if self.topics is not None and segment.topic not in self.topics:
                self._folded.add(segment.id)
                continue
            try:
                # Fetched and checked whole before the first record: a failure folds nothing of it.
                for record in read_segment(self.objects, segment):
                    fold(record)
            except SegmentUnreadable as error:
                # Missing or damaged: `feedloop archive verify`'s to report; skip it, do not retry forever.
                log.warning("archive_fold.segment_unreadable", path=segment.path, error=str(error))
            # An unreachable store (StorageUnavailable) propagates before this: the segment is read next call.
            self._folded.add(segment.id)
            self.segments_read += 1
