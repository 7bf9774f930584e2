"""The outbox on a real folder: records, recovery, cursors, segment removal, the bound."""

from __future__ import annotations

import logging
import os
import threading
import zlib

import pytest

from supervisor.publisher.outbox import HEADER, Outbox, OutboxError, segment_name


def payload(i: int, size: int = 100) -> bytes:
    return f"result-{i:06d}-".encode().ljust(size, b".")


def segments(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".seg"))


def take_all(outbox: Outbox, sink: str, batch: int = 7) -> list[tuple[int, bytes]]:
    """Read and advance until the sink has nothing pending."""
    taken = []
    while records := outbox.read(sink, batch):
        taken += records
        outbox.advance(sink, records[-1][0])
    return taken


def test_append_then_reopen_reads_the_same_records_in_order(tmp_path):
    with Outbox(str(tmp_path), 10 << 20, segment_bytes=1000, sinks=["a"]) as box:
        box.append_many([payload(i) for i in range(1, 11)])
        box.append_many([payload(i) for i in range(11, 26)])
        assert len(segments(tmp_path)) > 1  # the test covers reads across segments
    with Outbox(str(tmp_path), 10 << 20, segment_bytes=1000, sinks=["a"]) as box:
        assert box.next_seq == 26
        records = take_all(box, "a")
    assert records == [(i, payload(i)) for i in range(1, 26)]


def test_new_sink_starts_at_oldest_record_and_numbering_survives_full_delivery(tmp_path):
    with Outbox(str(tmp_path), 10 << 20, segment_bytes=500, sinks=["a"]) as box:
        box.append_many([payload(i) for i in range(1, 21)])
        take_all(box, "a")
        assert len(segments(tmp_path)) == 1  # only the segment being written is left
    with Outbox(str(tmp_path), 10 << 20, segment_bytes=500, sinks=["a", "late"]) as box:
        oldest = int(segments(tmp_path)[0][:-4])
        assert [seq for seq, _ in take_all(box, "late")] == list(range(oldest, 21))
        assert take_all(box, "a") == []
        box.append_many([payload(21)])
        assert take_all(box, "a") == [(21, payload(21))]


@pytest.mark.parametrize("damage", ["half header", "half payload", "bad crc"])
def test_torn_tail_is_cut_on_reopen_and_appends_continue(tmp_path, caplog, damage):
    with Outbox(str(tmp_path), 10 << 20, sinks=["a"]) as box:
        box.append_many([payload(i) for i in range(1, 6)])
    last = os.path.join(tmp_path, segments(tmp_path)[-1])
    good_size = os.path.getsize(last)
    torn = payload(6)
    record = HEADER.pack(len(torn), zlib.crc32(torn)) + torn
    with open(last, "ab") as f:
        if damage == "half header":
            f.write(record[:5])
        elif damage == "half payload":
            f.write(record[:HEADER.size + 40])
        else:
            f.write(record[:-1] + b"!")
    caplog.set_level(logging.WARNING)
    with Outbox(str(tmp_path), 10 << 20, sinks=["a"]) as box:
        assert os.path.getsize(last) == good_size
        assert box.next_seq == 6
        box.append_many([b"after"])
        assert take_all(box, "a") == [(i, payload(i)) for i in range(1, 6)] + [(6, b"after")]
    cut = len(record) if damage == "bad crc" else (5 if damage == "half header" else HEADER.size + 40)
    assert any(f"cut {cut} bytes" in r.getMessage() for r in caplog.records)


def test_cursors_persist_and_are_independent_per_sink(tmp_path):
    with Outbox(str(tmp_path), 10 << 20, segment_bytes=600, sinks=["a", "b"]) as box:
        box.append_many([payload(i) for i in range(1, 31)])
        records = box.read("a", 12)
        box.advance("a", records[-1][0])
        box.advance("b", 3)  # without a read first: the outbox finds the position itself
        assert box.stats()["sinks"] == {"a": {"pending": 18, "oldest_pending_seq": 13},
                                        "b": {"pending": 27, "oldest_pending_seq": 4}}
    with Outbox(str(tmp_path), 10 << 20, segment_bytes=600, sinks=["a", "b"]) as box:
        assert box.read("a", 1) == [(13, payload(13))]
        assert box.read("b", 1) == [(4, payload(4))]
        assert [s for s, _ in take_all(box, "b")] == list(range(4, 31))
        assert box.stats()["sinks"]["a"]["pending"] == 18  # b's progress moved nothing of a's
        assert box.stats()["outbox_results"] == 18


def test_segments_are_deleted_once_every_sink_passed_them(tmp_path):
    with Outbox(str(tmp_path), 10 << 20, segment_bytes=500, sinks=["fast", "slow"]) as box:
        box.append_many([payload(i) for i in range(1, 41)])
        all_segments = segments(tmp_path)
        assert len(all_segments) >= 4
        take_all(box, "fast")
        assert segments(tmp_path) == all_segments  # slow still needs them all
        box.advance("slow", int(all_segments[2][:-4]) - 1)  # through the end of the second segment
        assert segments(tmp_path) == all_segments[2:]
        take_all(box, "slow")
        assert segments(tmp_path) == all_segments[-1:]  # never the one being written
        assert box.stats()["outbox_results"] == 0


def test_bound_drops_oldest_segments_counts_them_and_moves_cursors(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    # 108-byte records, 5 per segment (540 bytes); bound 1500 bytes: at most 2 full segments + the tail.
    with Outbox(str(tmp_path), 1500, segment_bytes=500, sinks=["a", "b"]) as box:
        box.append_many([payload(i) for i in range(1, 4)])
        box.advance("b", 2)  # b took 1..2, a took nothing
        for i in range(4, 31):
            box.append_many([payload(i)])  # one commit each: the bound applies many times
        stats = box.stats()
        assert stats["outbox_bytes"] <= 1500
        first = int(segments(tmp_path)[0][:-4])
        assert first > 1
        # Everything before the oldest segment left is dropped for a; counted once per record.
        assert stats["dropped"] == first - 1
        assert box.read("a", 1)[0][0] == first
        assert box.read("b", 1)[0][0] == first
        assert [s for s, _ in take_all(box, "a")] == list(range(first, 31))
    drop_logs = [r for r in caplog.records if "over its bound" in r.getMessage()]
    assert len(drop_logs) == 1  # one burst, one warning
    with Outbox(str(tmp_path), 1500, segment_bytes=500, sinks=["a", "b"]) as box:
        assert box.stats()["dropped"] == first - 1  # the counter survives a restart


def test_bound_never_drops_the_segment_being_written(tmp_path):
    with Outbox(str(tmp_path), 100, segment_bytes=10_000, sinks=["a"]) as box:
        box.append_many([payload(i) for i in range(1, 11)])
        assert box.stats()["dropped"] == 0
        assert [s for s, _ in take_all(box, "a")] == list(range(1, 11))


def test_read_stays_within_its_byte_budget(tmp_path):
    with Outbox(str(tmp_path), 100 << 20, sinks=["a"]) as box:
        box.append_many([payload(i, 10_000) for i in range(1, 101)])
        assert len(box.read("a", 100, max_bytes=35_000)) == 4
        assert len(box.read("a", 100, max_bytes=10)) == 1  # always at least one record


def test_second_outbox_on_the_same_folder_is_refused(tmp_path):
    with Outbox(str(tmp_path), 1 << 20, sinks=["a"]):
        with pytest.raises(OutboxError, match="in use"):
            Outbox(str(tmp_path), 1 << 20, sinks=["a"])


def test_reader_thread_sees_every_record_in_order_during_appends(tmp_path):
    total = 3000
    seen: list[int] = []
    errors: list[BaseException] = []
    with Outbox(str(tmp_path), 100 << 20, segment_bytes=20_000, sinks=["a"]) as box:
        done = threading.Event()

        def reader():
            try:
                while len(seen) < total:
                    records = box.read("a", 50)
                    for seq, data in records:
                        assert data == payload(seq), f"record {seq} reads back wrong"
                        seen.append(seq)
                    if records:
                        box.advance("a", records[-1][0])
                    elif done.is_set() and box.pending("a") == 0:
                        break
            except BaseException as e:  # surfaced in the main thread below
                errors.append(e)

        thread = threading.Thread(target=reader)
        thread.start()
        seq = 1
        while seq <= total:
            batch = [payload(i) for i in range(seq, min(total + 1, seq + 37))]
            box.append_many(batch)
            seq += len(batch)
        done.set()
        thread.join(30)
        assert not thread.is_alive()
    assert not errors, errors
    assert seen == list(range(1, total + 1))
    assert len(segments(tmp_path)) == 1  # each finished segment went once the reader passed it


def test_segment_names_are_the_first_seq(tmp_path):
    with Outbox(str(tmp_path), 10 << 20, segment_bytes=300, sinks=["a"]) as box:
        box.append_many([payload(i) for i in range(1, 8)])
    assert segments(tmp_path)[0] == segment_name(1) == "00000000000000000001.seg"
    assert segments(tmp_path)[1] == segment_name(4)  # 3 records of 108 bytes reach 300


def test_reader_thread_keeps_going_while_the_bound_drops_segments(tmp_path):
    total = 4000
    seen: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()
    with Outbox(str(tmp_path), 20_000, segment_bytes=4_000, sinks=["a"]) as box:

        def reader():
            try:
                while not (done.is_set() and box.pending("a") == 0):
                    records = box.read("a", 13)
                    for seq, data in records:
                        assert data == payload(seq), f"record {seq} reads back wrong"
                        seen.append(seq)
                    if records:
                        box.advance("a", records[-1][0])
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=reader)
        thread.start()
        for seq in range(1, total + 1, 20):
            box.append_many([payload(i) for i in range(seq, seq + 20)])
        done.set()
        thread.join(30)
        assert not thread.is_alive()
        dropped = box.stats()["dropped"]
        assert box.stats()["outbox_bytes"] <= 20_000
    assert not errors, errors
    assert seen == sorted(set(seen)) and seen[-1] == total  # in order, no repeats, up to the end
    assert len(seen) + dropped >= total  # what the reader did not see was dropped and counted


def test_small_bounds_get_small_segments_and_hold_about_their_bound(tmp_path):
    from supervisor.publisher.outbox import default_segment_bytes

    assert default_segment_bytes(64 << 10) == 8 << 10
    assert default_segment_bytes(1 << 30) == 64 << 20 and default_segment_bytes(1000) == 4 << 10
    with Outbox(str(tmp_path), 64 << 10, sinks=["a"]) as box:
        for i in range(200):
            box.append_many([payload(i, 1000)])
            assert box.stats()["outbox_bytes"] <= (64 << 10) + (8 << 10) + 1008
        assert box.stats()["dropped"] > 100


def test_cursor_saves_from_several_threads_never_collide(tmp_path):
    """Sink threads advancing and the main thread's once-a-second save share the cursor files'
    temp names: they must take turns."""
    errors: list[BaseException] = []
    with Outbox(str(tmp_path), 100 << 20, segment_bytes=2000, sinks=["a", "b"]) as box:
        box.append_many([payload(i) for i in range(1, 601)])
        done = threading.Event()

        def sink(name):
            try:
                while records := box.read(name, 3):
                    box.advance(name, records[-1][0])
                    box._saved_at = 0.0  # save on every advance: as many writers as we can get
            except BaseException as e:
                errors.append(e)

        def saver():
            try:
                while not done.is_set():
                    box.save_cursors()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=sink, args=(n,)) for n in ("a", "b")] + [threading.Thread(target=saver)]
        for t in threads:
            t.start()
        for t in threads[:2]:
            t.join(60)
        done.set()
        threads[2].join(10)
        assert not errors, errors
        assert box.pending("a") == box.pending("b") == 0
    with Outbox(str(tmp_path), 100 << 20, segment_bytes=2000, sinks=["a", "b"]) as box:
        assert box.pending("a") == box.pending("b") == 0  # the last cursors were saved
    assert not [n for n in os.listdir(tmp_path) if ".tmp." in n]


def test_segments_removed_from_disk_are_skipped_and_logged_and_appends_go_on(tmp_path, caplog):
    """Someone deletes segment files under a running outbox (the oldest, and the one being
    written): the sink moves past what is lost, says so, and everything appended afterwards
    is read; it never stalls on the missing files."""
    caplog.set_level(logging.ERROR, logger="publisher")
    with Outbox(str(tmp_path), 100 << 20, segment_bytes=2_000, sinks=["a"]) as box:
        box.append_many([payload(i) for i in range(1, 61)])
        names = segments(tmp_path)
        assert len(names) >= 3
        os.unlink(tmp_path / names[0])  # records 1.. of the first segment
        os.unlink(tmp_path / names[-1])  # the segment being written
        first_of_second = int(names[1].removesuffix(".seg"))
        first_of_last = int(names[-1].removesuffix(".seg"))
        box.append_many([payload(i) for i in range(61, 71)])  # into a new segment, not the removed file
        taken = [seq for seq, _ in take_all(box, "a")]
        assert taken == list(range(first_of_second, first_of_last)) + list(range(61, 71))
        assert box.pending("a") == 0
    text = caplog.text
    assert f"segment removed from disk in {names[0]}" in text and f"skips {first_of_second - 1} results" in text
    assert f"{names[-1]} was removed from disk; going on in a new segment" in text
    assert segments(tmp_path)[-1] == segment_name(61)
