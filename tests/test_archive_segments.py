"""Archive segments: exact bytes in, exact bytes out; checksums that catch tampering; a
recorded segment never replaced, a crash's orphan replaced. On a directory and on S3."""

import gzip

import pytest

from streams.objects import ObjectStorage, ObjectStore
from streams.store import ArchiveSegment, make_engine, make_sessionmaker
from streams.archive import (
    PartitionBuffer,
    SegmentRecorded,
    SegmentUnreadable,
    decode_record,
    encode_record,
    read_segment,
    segment_key,
    segment_path,
    verify_archive,
    write_segment,
)
import migrations


@pytest.fixture(params=["file", "s3"])
def objects(request, tmp_path) -> ObjectStore:
    if request.param == "file":
        return ObjectStore(tmp_path.as_uri())
    storage: ObjectStorage = request.getfixturevalue("s3_storage")
    return ObjectStore(storage.url, storage)


def recorded(relative, digest: str) -> ArchiveSegment:
    """The row fields a reader uses."""
    return ArchiveSegment(path=str(relative), sha256=digest)


def test_records_round_trip_exactly_even_when_not_utf8():
    cases = [
        (b"k1", b'{"a": "\xc3\xa9"}', [("app_id", b"app-a")]),
        (None, b"\xff\x00binary", [("h", b"\xfe")]),
        (b"\x80", None, []),
    ]
    for key, value, headers in cases:
        record = decode_record(encode_record("t", 2, 41, 1700, key, value, headers))
        assert (record.key, record.value, record.headers) == (key, value, dict(headers))
        assert (record.topic, record.partition, record.offset, record.timestamp_ms) == ("t", 2, 41, 1700)


def test_same_records_give_the_same_segment_bytes(tmp_path):
    lines = [encode_record("t", 0, i, 1000 + i, b"k", b"v%d" % i) for i in range(100)]
    relative = segment_path("c", "t", 0, 0)
    a, b = ObjectStore((tmp_path / "a").as_uri()), ObjectStore((tmp_path / "b").as_uri())
    digest_a, size_a = write_segment(a, relative, lines)
    digest_b, size_b = write_segment(b, relative, lines)
    assert (digest_a, size_a) == (digest_b, size_b)
    assert [r.offset for r in read_segment(a, recorded(relative, digest_a))] == list(range(100))


def test_a_segment_is_the_file_it_always_was_under_the_data_dir(tmp_path):
    relative = segment_path("c", "t", 3, 7)
    write_segment(ObjectStore(tmp_path.as_uri()), relative, [encode_record("t", 3, 7, 0, None, b"v")])
    assert segment_key(relative) == "archive/c/t/p003/00000000000000000007.jsonl.gz"
    assert gzip.decompress((tmp_path / "archive" / relative).read_bytes()).startswith(b'{"')


def test_a_recorded_segment_is_never_replaced_an_orphan_is(objects):
    relative = segment_path("c", "t", 0, 0)
    first = [encode_record("t", 0, i, 0, None, b"first") for i in range(3)]
    digest, _ = write_segment(objects, relative, first)
    with pytest.raises(SegmentRecorded, match="already recorded"):
        write_segment(objects, relative, first[:2])  # without a say, a taken name is a recorded one
    with pytest.raises(SegmentRecorded):
        write_segment(objects, relative, first[:2], recorded=lambda: True)
    assert [r.offset for r in read_segment(objects, recorded(relative, digest))] == [0, 1, 2]

    # No row: a crash between the put and the row; the records read again seal over it.
    again = [encode_record("t", 0, i, 0, None, b"again") for i in range(5)]
    digest_again, _ = write_segment(objects, relative, again, recorded=lambda: False)
    assert [r.value for r in read_segment(objects, recorded(relative, digest_again))] == [b"again"] * 5
    assert objects.keys("archive") == [segment_key(relative)]


def test_a_reader_refuses_bytes_that_are_not_the_recorded_ones(objects):
    relative = segment_path("c", "t", 0, 0)
    digest, _ = write_segment(objects, relative, [encode_record("t", 0, 0, 0, None, b"v")])
    objects.put(segment_key(relative), gzip.compress(b'{"tampered": 1}\n'))
    with pytest.raises(SegmentUnreadable, match="checksum .* `feedloop archive verify`"):
        list(read_segment(objects, recorded(relative, digest)))
    objects.delete(segment_key(relative))
    with pytest.raises(SegmentUnreadable, match="missing"):
        list(read_segment(objects, recorded(relative, digest)))


def test_buffer_is_due_by_count_or_age():
    buffer = PartitionBuffer("t", 0)
    assert not buffer.due(now=100.0, max_events=3, max_seconds=1.0)  # empty is never due
    buffer.add(5, 1, "x", now=100.0)
    assert not buffer.due(now=100.5, max_events=3, max_seconds=1.0)
    assert buffer.due(now=101.0, max_events=3, max_seconds=1.0)
    buffer.add(6, 2, "y", now=101.0)
    buffer.add(7, 3, "z", now=101.0)
    assert buffer.due(now=100.1, max_events=3, max_seconds=1.0)
    assert (buffer.first_offset, buffer.last_offset) == (5, 7)


def test_verify_finds_missing_tampered_and_miscounted_segments(tmp_path, objects):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    migrations.upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    rows = []
    for first in (0, 10, 20, 30):
        relative = segment_path("c", "t", 0, first)
        lines = [encode_record("t", 0, first + i, 0, b"k", b"v") for i in range(10)]
        digest, size = write_segment(objects, relative, lines)
        rows.append(ArchiveSegment(cluster_id="c", topic="t", partition=0, first_offset=first,
                                   last_offset=first + 9, event_count=10, path=str(relative), sha256=digest,
                                   size_bytes=size, first_timestamp_ms=0, last_timestamp_ms=0))
    with sessions.begin() as session:
        session.add_all(rows)
    with sessions() as session:
        assert verify_archive(session, objects).ok

    objects.delete(segment_key(segment_path("c", "t", 0, 10)))
    objects.put(segment_key(segment_path("c", "t", 0, 20)), gzip.compress(b'{"tampered": 1}\n'))
    with sessions.begin() as session:
        session.query(ArchiveSegment).filter_by(first_offset=30).update({"event_count": 11})
    with sessions() as session:
        report = verify_archive(session, objects)
    assert len(report.problems) == 3
    assert "missing" in report.problems[0]
    assert "checksum" in report.problems[1]
    assert "recorded 11" in report.problems[2]


def test_a_segments_time_range_spans_out_of_order_record_timestamps():
    # Producers stamp records (CreateTime): one partition may hold a 2021 record after a 2026
    # one, and a replay's --since/--until picks segments by this range.
    buffer = PartitionBuffer("t", 0)
    for offset, stamp in enumerate([1_700_000_000_000, 1_600_000_000_000, 1_800_000_000_000, 1_650_000_000_000]):
        buffer.add(offset, stamp, "{}", now=0.0)
    assert (buffer.first_timestamp_ms, buffer.last_timestamp_ms) == (1_600_000_000_000, 1_800_000_000_000)
    assert (buffer.first_offset, buffer.last_offset) == (0, 3)
