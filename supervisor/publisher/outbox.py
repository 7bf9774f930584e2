"""The publisher's durable outbox: append-only segment files, one cursor per sink.

Layout of the folder:

    00000000000000000001.seg    records 1.. (a segment is named by its first record's seq)
    00000000000000004711.seg    the last segment: the one being written
    cursor.<sink>               {"next_seq", "segment", "offset"}: where that sink resumes
    stats                       {"dropped"}: survives restarts
    lock                        flock'ed while open: one outbox owner at a time

A record is a 4-byte big-endian payload length, the payload's CRC32, then the payload.
Records are numbered 1, 2, 3, ... across segments and restarts. `append_many` is a group
commit: every record of the batch, then one fsync. Readers (the sink threads) see a record
only once its fsync is done, so what a sink delivers is always on disk.

A failed append (ENOSPC, EROFS, EIO) leaves nothing behind: the active segment is truncated
back to its committed size and the segment files the batch had begun are removed, so the
next append (the caller retries) starts on a record boundary. If even that cleanup fails, it
is tried again before the next append, which does not write until it succeeds. A cursor that
cannot be saved stays in memory, marked unsaved, and no segment is deleted while any cursor
is unsaved; the main thread retries every second.

Recovery reads only the last segment (an earlier segment's record count is the difference of
two file names), and cuts a torn tail there. A segment is deleted once every sink's cursor is
past it; when the segments outgrow `max_bytes`, the oldest are dropped, delivered or not.
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import os
import re
import struct
import threading
import time
import zlib

import msgspec

from supervisor.files import fsync_dir, write_atomic

log = logging.getLogger("publisher")

HEADER = struct.Struct(">II")  # payload length, CRC32 of the payload
SEGMENT_SUFFIX = ".seg"
SEQ_DIGITS = 20
READ_MAX_BYTES = 16 << 20  # one read() returns at most about this much (always >= 1 record)
DROP_LOG_QUIET = 60.0  # drops closer together than this are one burst: logged once
_READ_CHUNK = 1 << 20
_TEMP_FILE = re.compile(r"\.tmp\.\d+$")


CURSOR_SAVE_INTERVAL = 1.0


class OutboxError(OSError):
    """The outbox cannot be used (another process holds it, or a write failed)."""


class Cursor(msgspec.Struct, frozen=True):
    """Where a sink resumes: the seq of its next record and where that record starts."""

    next_seq: int
    segment: int  # first seq (the name) of the segment holding next_seq, or of the one before it at its end
    offset: int


class _Stats(msgspec.Struct):
    dropped: int = 0


class _Segment:
    __slots__ = ("first_seq", "path", "size")

    def __init__(self, first_seq: int, path: str, size: int):
        self.first_seq = first_seq
        self.path = path
        self.size = size  # committed bytes: readers never read past this


def segment_name(first_seq: int) -> str:
    return f"{first_seq:0{SEQ_DIGITS}d}{SEGMENT_SUFFIX}"


def default_segment_bytes(max_bytes: int) -> int:
    """An eighth of the bound (so a drop takes about an eighth of the outbox), 4 KiB to 64 MiB.
    Small bounds get small segments: a 64 KiB outbox holds about 64 KiB, not a 1 MiB segment."""
    return min(64 << 20, max(4 << 10, max_bytes // 8))


class Outbox:
    def __init__(self, folder: str, max_bytes: int, segment_bytes: int | None = None,
                 sinks: list[str] | tuple[str, ...] = ()):
        self.folder = folder
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or default_segment_bytes(max_bytes)
        self.dropped = 0
        self._unsaved: set[str] = set()  # sinks whose cursor moved since it was saved
        self._saved_at = 0.0
        self._lock = threading.Lock()  # guards the metadata below; never held across an fsync of a segment
        self._save_lock = threading.Lock()  # one cursor saver at a time (taken before _lock, never inside it)
        self._append_lock = threading.Lock()  # one writer at a time
        self._segments: list[_Segment] = []
        self._firsts: list[int] = []  # first_seq of each segment, for bisect
        self._next_seq = 1  # seq of the next record to append; everything below is committed
        self._cursors: dict[str, Cursor] = {}
        # sink -> (first seq, (segment, end offset) of each record) of its last read, to advance without a scan
        self._last_read: dict[str, tuple[int, list[tuple[int, int]]]] = {}
        self._gaps: set[str] = set()  # segments found short of the next one (logged)
        self._fd = -1
        self._torn = False  # a failed append may have left bytes past the committed size: cut them first
        self._created: list[str] = []  # segment files begun by the append in progress
        self.cursor_error: str | None = None  # why the last cursor save failed (None: saved)
        self._drop_burst_at = -DROP_LOG_QUIET  # monotonic time of the last drop
        self._dropped_unlogged = 0
        os.makedirs(folder, mode=0o700, exist_ok=True)
        self._lock_fd = os.open(os.path.join(folder, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise OutboxError(f"outbox {folder} is in use by another process") from None
        try:
            self._recover(list(sinks))
        except BaseException:
            self.close()
            raise

    # -- opening -------------------------------------------------------------------------

    def _recover(self, sinks: list[str]) -> None:
        self._remove_temp_files(sinks)
        self.dropped = self._load_stats().dropped
        names = sorted((int(n[:-len(SEGMENT_SUFFIX)]), n) for n in os.listdir(self.folder)
                       if n.endswith(SEGMENT_SUFFIX) and n[:-len(SEGMENT_SUFFIX)].isdigit())
        for first, name in names:
            path = os.path.join(self.folder, name)
            self._segments.append(_Segment(first, path, os.stat(path).st_size))
            self._firsts.append(first)
        saved = {name: self._load_cursor(name) for name in sinks}
        cut = False
        if self._segments:
            last = self._segments[-1]
            size_before = last.size
            last.size, count = self._recover_tail(last)
            cut = last.size < size_before
            self._next_seq = last.first_seq + count
        else:
            # Everything was delivered and removed (or this is a new outbox): the cursors
            # still remember how far the numbering went.
            self._next_seq = max([1] + [c.next_seq for c in saved.values() if c is not None])
            self._new_segment(self._next_seq)
        self._fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        for name, cursor in saved.items():
            if cursor is not None and cursor.next_seq > self._next_seq and not cut:  # (a cut is logged)
                log.error("outbox: sink %s had taken results up to %d but %s ends at %d: the segment lost "
                          "results", name, cursor.next_seq - 1, self._segments[-1].path, self._next_seq - 1)
        for seg, after in zip(self._segments, self._segments[1:]):
            if seg.size == 0:
                log.error("outbox: %s is empty: results %d..%d are lost", seg.path, seg.first_seq,
                          after.first_seq - 1)
        for name in sinks:
            self._cursors[name] = self._valid_cursor(name, saved[name])
        self._remove_passed_segments()
        self._enforce_bound()

    def _remove_temp_files(self, sinks: list[str]) -> None:
        """Remove what a write_atomic interrupted by a crash left: `<file>.tmp.<pid>`."""
        keep = {f"cursor.{sink}" for sink in sinks}  # a sink may be named like a temp file
        for name in os.listdir(self.folder):
            if _TEMP_FILE.search(name) and name not in keep:
                try:
                    os.unlink(os.path.join(self.folder, name))
                except OSError:
                    pass

    def _recover_tail(self, seg: _Segment) -> tuple[int, int]:
        """Scan the last segment; cut a torn or corrupt tail. Returns (good size, records)."""
        good = 0
        count = 0
        problem = ""
        with open(seg.path, "rb") as f:
            while True:
                header = f.read(HEADER.size)
                if not header:
                    break
                if len(header) < HEADER.size:
                    problem = "short record header"
                    break
                length, crc = HEADER.unpack(header)
                if length == 0:
                    problem = "zero-length record"
                    break
                if length > seg.size - good - HEADER.size:
                    problem = "short record payload"
                    break
                payload = f.read(length)
                if zlib.crc32(payload) != crc:
                    problem = "CRC mismatch"
                    break
                good += HEADER.size + length
                count += 1
        if good < seg.size:
            cut = seg.size - good
            kept = self._quarantine_tail(seg.path, good)
            fd = os.open(seg.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, good)
                os.fsync(fd)
            finally:
                os.close(fd)
            log.warning("outbox: cut %d bytes of torn or corrupt tail (%s) from %s after record %d "
                        "(the bytes are kept in %s)", cut, problem, seg.path, seg.first_seq + count - 1, kept)
        return good, count

    def _quarantine_tail(self, path: str, good: int) -> str:
        """Copy what is about to be cut from a segment to state_dir/quarantine/ (it may hold
        results a damaged record hides); the name, or why it could not be kept."""
        folder = os.path.join(os.path.dirname(os.path.abspath(self.folder)), "quarantine")
        target = os.path.join(folder, f"outbox-{os.path.basename(path)}-{good}-{time.time_ns()}")
        try:
            with open(path, "rb") as f:
                f.seek(good)
                data = f.read()
            os.makedirs(folder, mode=0o700, exist_ok=True)
            write_atomic(target, data)
        except OSError as e:
            return f"nowhere: {e}"
        return target

    def _load_stats(self) -> _Stats:
        try:
            with open(os.path.join(self.folder, "stats"), "rb") as f:
                return msgspec.json.decode(f.read(), type=_Stats)
        except FileNotFoundError:
            return _Stats()
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("outbox: cannot read %s/stats (%s); the dropped count restarts at 0", self.folder, e)
            return _Stats()

    def _load_cursor(self, sink: str) -> Cursor | None:
        path = self._cursor_path(sink)
        try:
            with open(path, "rb") as f:
                return msgspec.json.decode(f.read(), type=Cursor)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("outbox: cannot read %s (%s); sink %s starts again at the oldest result", path, e, sink)
            return None

    def _valid_cursor(self, sink: str, cursor: Cursor | None) -> Cursor:
        """The saved cursor if it still points at a record boundary we have, else the
        nearest valid position (a new sink starts at the oldest record present)."""
        oldest = self._segments[0]
        if cursor is None or cursor.next_seq <= oldest.first_seq:
            return Cursor(oldest.first_seq, oldest.first_seq, 0)
        if cursor.next_seq >= self._next_seq:
            last = self._segments[-1]
            return Cursor(self._next_seq, last.first_seq, last.size)
        seg = self._segment(cursor.segment)
        if seg is not None and cursor.offset <= seg.size:
            return cursor
        log.warning("outbox: cursor of sink %s points at a missing position; searching for record %d",
                    sink, cursor.next_seq)
        return self._locate(cursor.next_seq)

    # -- appending -----------------------------------------------------------------------

    def append_many(self, payloads: list[bytes]) -> None:
        """Write every payload, then one fsync: when this returns, all of them are durable."""
        if not payloads:
            return
        with self._append_lock:
            if self._torn:
                self._roll_back()  # raises while it still cannot cut: nothing is written behind garbage
            self._created = []
            try:
                self._append_locked(payloads)
            except OSError:
                # The file may now hold a partial record after the committed size; appending
                # more behind it would bury good records: cut it now (or before the next append).
                self._torn = True
                try:
                    self._roll_back()
                except OSError as e:
                    log.error("outbox: cannot cut a failed append back yet (%s); trying again before the next one", e)
                raise
        self._enforce_bound()

    def _roll_back(self) -> None:
        """Undo a failed append: back to the last committed segment and size. Call with the
        append lock held."""
        with self._lock:
            active = self._segments[-1]
            size = active.size
        if self._created:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._fd = os.open(active.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            for path in self._created:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            self._created = []
        elif self._fd < 0:
            self._fd = os.open(active.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        os.ftruncate(self._fd, size)
        self._torn = False

    def _append_locked(self, payloads: list[bytes]) -> None:
        with self._lock:
            active = self._segments[-1]
            size = active.size
            seq = self._next_seq
        first_in_file = active.first_seq
        active_final_size = size
        new_segments: list[_Segment] = []
        buf = bytearray()
        if os.fstat(self._fd).st_nlink == 0:  # someone removed the file we write: nothing added there could be read
            log.error("outbox: %s was removed from disk; going on in a new segment", active.path)
            new_segments.append(_Segment(seq, self._new_segment_file(seq), 0))
            first_in_file = seq
            size = 0
        for payload in payloads:
            if size >= self.segment_bytes and seq > first_in_file:
                self._write_all(buf)
                buf.clear()
                os.fsync(self._fd)  # a finished segment is complete on disk before the next begins
                if new_segments:
                    new_segments[-1].size = size
                else:
                    active_final_size = size
                new_segments.append(_Segment(seq, self._new_segment_file(seq), 0))
                first_in_file = seq
                size = 0
            buf += HEADER.pack(len(payload), zlib.crc32(payload))
            buf += payload
            size += HEADER.size + len(payload)
            seq += 1
        self._write_all(buf)
        os.fsync(self._fd)
        with self._lock:  # only now may readers see these records
            if new_segments:
                active.size = active_final_size
                new_segments[-1].size = size
                self._segments.extend(new_segments)
                self._firsts.extend(s.first_seq for s in new_segments)
            else:
                active.size = size
            self._next_seq = seq

    def _write_all(self, buf: bytearray) -> None:
        view = memoryview(buf)
        while view:
            view = view[os.write(self._fd, view):]

    def _new_segment_file(self, first_seq: int) -> str:
        """Close the current segment file and start the next; returns its path."""
        path = os.path.join(self.folder, segment_name(first_seq))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._created.append(path)
        try:
            fsync_dir(self.folder)  # the new name is durable before any record in it is acknowledged
        except OSError:
            os.close(fd)
            raise
        os.close(self._fd)
        self._fd = fd
        return path

    def _new_segment(self, first_seq: int) -> None:
        """The first segment of an empty outbox (at open, before any reader exists)."""
        path = os.path.join(self.folder, segment_name(first_seq))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.close(fd)
        fsync_dir(self.folder)
        self._segments.append(_Segment(first_seq, path, 0))
        self._firsts.append(first_seq)

    # -- reading -------------------------------------------------------------------------

    def read(self, sink: str, max_records: int, max_bytes: int = READ_MAX_BYTES) -> list[tuple[int, bytes]]:
        """Up to `max_records` committed records after the sink's cursor, oldest first.

        At most about `max_bytes` of payload (always at least one record). Safe to call while
        another thread appends: it never reads past the committed size. One thread per sink.
        """
        return self._read(sink, max_records, max_bytes, remember=True)

    def peek(self, sink: str) -> tuple[int, bytes] | None:
        """The sink's oldest pending record, if any (for its age in the stats)."""
        records = self._read(sink, 1, READ_MAX_BYTES, remember=False)
        return records[0] if records else None

    def _read(self, sink: str, max_records: int, max_bytes: int, remember: bool) -> list[tuple[int, bytes]]:
        for _ in range(5):  # a segment may be dropped between our look and our open: look again
            with self._lock:
                cursor = self._normalized_cursor(sink)
                if cursor.next_seq >= self._next_seq:
                    return []
                i = self._firsts.index(cursor.segment)
                # (path, first seq, committed end) of each segment from the cursor's on
                plan = [(s.path, s.first_seq, s.size) for s in self._segments[i:]]
            records: list[tuple[int, bytes]] = []
            ends: list[tuple[int, int]] = []  # (segment, offset after the record), per record
            offset, seq, taken = cursor.offset, cursor.next_seq, 0
            for path, first_seq, end in plan:
                if offset == 0 and seq != first_seq:  # the segment before ended short of this one
                    self._report_gap(plan, first_seq, seq)
                    break
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    if not records and first_seq == cursor.segment:
                        # Removed from disk, and not by us (we move every cursor out of a
                        # segment before we unlink it, so this is then a no-op): what it held
                        # is lost; move past it rather than stall the sink.
                        self._skip_corrupt(sink, cursor, "segment removed from disk")
                    break
                try:
                    got, got_ends, corrupt = _read_records(fd, offset, end, seq, max_records - len(records),
                                                           max_bytes - taken, bool(records))
                finally:
                    os.close(fd)
                records += got
                ends += [(first_seq, e) for e in got_ends]
                if corrupt and not records:
                    self._skip_corrupt(sink, cursor, corrupt)
                taken += sum(len(p) for _, p in got)
                if corrupt or len(records) >= max_records or taken >= max_bytes:
                    break
                seq += len(got)
                offset = 0
            if records:
                if remember:
                    with self._lock:
                        self._last_read[sink] = (cursor.next_seq, ends)
                return records
        return []

    def _report_gap(self, plan, first_seq: int, seq: int) -> None:
        """A segment before `first_seq` holds fewer records than the names say (it was cut on
        disk); records seq..first_seq-1 are lost. Logged once per segment."""
        before = [p for p, f, _ in plan if f < first_seq][-1]
        with self._lock:
            if before in self._gaps:
                return
            self._gaps.add(before)
        log.error("outbox: %s ends after record %d, short of the next segment: results %d..%d are lost",
                  before, seq - 1, seq, first_seq - 1)

    def _normalized_cursor(self, sink: str) -> Cursor:
        """The sink's cursor, moved to the start of the next segment when it sits at the end
        of a finished one. Call with the lock held."""
        cursor = self._cursors[sink]
        i = bisect.bisect_left(self._firsts, cursor.segment)
        if i == len(self._firsts) or self._firsts[i] != cursor.segment:  # its segment is gone
            cursor = self._locate(max(cursor.next_seq, self._firsts[0]))
            i = bisect.bisect_left(self._firsts, cursor.segment)
        while i + 1 < len(self._segments) and cursor.offset >= self._segments[i].size:
            i += 1
            cursor = Cursor(self._segments[i].first_seq, self._segments[i].first_seq, 0)
        self._cursors[sink] = cursor
        return cursor

    def _skip_corrupt(self, sink: str, cursor: Cursor, problem: str) -> None:
        """A committed record no longer reads back (the disk changed it): nothing after it in
        that segment can be found, so move past the segment rather than stall the sink."""
        with self._lock:
            if self._cursors[sink] != cursor:
                return
            i = self._firsts.index(cursor.segment)
            if i + 1 < len(self._segments):
                after = self._segments[i + 1].first_seq
                self._cursors[sink] = Cursor(after, after, 0)
            else:
                after = self._next_seq
                self._cursors[sink] = Cursor(after, cursor.segment, self._segments[i].size)
            lost = after - cursor.next_seq
            self._unsaved.add(sink)
        log.error("outbox: %s in %s at offset %d: sink %s skips %d results (%d..%d)",
                  problem, segment_name(cursor.segment), cursor.offset, sink, lost, cursor.next_seq, after - 1)
        self.save_cursors()

    # -- delivery progress ---------------------------------------------------------------

    def advance(self, sink: str, seq: int) -> None:
        """Mark every record up to `seq` delivered to `sink`; persist the cursor, then delete
        the segments every sink has passed."""
        with self._lock:
            cursor = self._cursors[sink]
            if seq < cursor.next_seq:
                return  # already past it (a drop moved the cursor while the sink delivered)
            if seq >= self._next_seq:
                raise ValueError(f"cannot advance sink {sink} to {seq}: last record is {self._next_seq - 1}")
            new = self._position_after(sink, seq)
            self._cursors[sink] = new
            self._unsaved.add(sink)
        # A cursor that lags on disk only means duplicates after a crash (delivery is at least
        # once), so it is saved at most once a second, and always before a segment goes.
        if time.monotonic() - self._saved_at >= CURSOR_SAVE_INTERVAL:
            try:
                self.save_cursors()
            except OSError:
                return  # noted in cursor_error; the main thread tries again every second
        self._remove_passed_segments()

    def save_cursors(self) -> None:
        """Persist every cursor that moved since it was last saved.

        One saver at a time (sink threads and the main thread all call this): two writers
        of one cursor file would share its temp name, and a caller about to delete segments
        must not go on while another thread is still writing a cursor it took."""
        with self._save_lock:
            with self._lock:
                unsaved = {name: self._cursors[name] for name in self._unsaved if name in self._cursors}
                self._unsaved.clear()
                self._saved_at = time.monotonic()
            left = list(unsaved)
            for name, cursor in unsaved.items():
                try:
                    self._persist_cursor(name, cursor)
                    left.remove(name)
                except OSError as e:
                    with self._lock:
                        self._unsaved.update(left)  # try them again next time
                    if self.cursor_error is None:
                        log.error("outbox: cannot save the cursor of sink %s: %s; it stays in memory and is "
                                  "tried again every second (a crash meanwhile only means duplicates)", name, e)
                    self.cursor_error = f"cannot save the cursor of sink {name}: {e}"
                    raise
            if unsaved and self.cursor_error is not None:
                log.info("outbox: sink cursors saved again")
                self.cursor_error = None

    def _position_after(self, sink: str, seq: int) -> Cursor:
        last = self._last_read.get(sink)
        if last is not None:
            first, ends = last
            if first <= seq < first + len(ends):
                segment, offset = ends[seq - first]
                return Cursor(seq + 1, segment, offset)
        return self._locate(seq + 1)

    def _locate(self, seq: int) -> Cursor:
        """Where record `seq` starts, by walking record headers in its segment (slow path)."""
        if seq >= self._next_seq:
            last = self._segments[-1]
            return Cursor(self._next_seq, last.first_seq, last.size)
        i = max(0, bisect.bisect_right(self._firsts, seq) - 1)
        seg = self._segments[i]
        if seq <= seg.first_seq:
            return Cursor(seg.first_seq, seg.first_seq, 0)
        offset = 0
        current = seg.first_seq
        fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while current < seq and offset < seg.size:
                header = os.pread(fd, HEADER.size, offset)
                if len(header) < HEADER.size:
                    break
                length, _ = HEADER.unpack(header)
                offset += HEADER.size + length
                current += 1
        finally:
            os.close(fd)
        return Cursor(current, seg.first_seq, min(offset, seg.size))

    def _persist_cursor(self, sink: str, cursor: Cursor) -> None:
        write_atomic(self._cursor_path(sink), msgspec.json.encode(cursor))

    def _cursor_path(self, sink: str) -> str:
        return os.path.join(self.folder, f"cursor.{sink}")

    def _remove_passed_segments(self) -> None:
        if self._unsaved and len(self._segments) > 1 and self._slowest_next_seq() >= self._segments[1].first_seq:
            try:
                self.save_cursors()  # no cursor on disk may point into a segment about to be deleted
            except OSError:
                return  # the segments stay until the cursors are saved
        with self._lock:
            passed = []
            # Passed: every sink has reached the first record of the next segment.
            while (self._cursors and len(self._segments) > 1
                   and self._slowest_next_seq() >= self._segments[1].first_seq):
                passed.append(self._pop_oldest())
        self._unlink(passed)

    def _slowest_next_seq(self) -> int:
        """The oldest record some sink still needs (with no sinks: the oldest present)."""
        if not self._cursors:
            return self._firsts[0]
        return min(c.next_seq for c in self._cursors.values())

    def _pop_oldest(self) -> _Segment:
        """Forget the oldest segment; cursors in it (or at its end) move to the next one."""
        seg = self._segments.pop(0)
        self._firsts.pop(0)
        after = self._firsts[0]
        for name, cursor in self._cursors.items():
            if cursor.next_seq < after or cursor.segment == seg.first_seq:
                self._cursors[name] = Cursor(after, after, 0)
        return seg

    def _unlink(self, segments: list[_Segment]) -> None:
        if not segments:
            return
        try:
            for seg in segments:
                try:
                    os.unlink(seg.path)
                except FileNotFoundError:
                    pass
            fsync_dir(self.folder)
        except OSError as e:  # a read-only state_dir: the files stay; the next start finds them passed
            log.error("outbox: cannot remove %d passed segment(s): %s", len(segments), e)

    # -- the bound -----------------------------------------------------------------------

    def near_bound(self) -> bool:
        """Over half of max_bytes: a sink that waits to batch should not wait now."""
        with self._lock:
            return sum(s.size for s in self._segments) > self.max_bytes // 2

    def _enforce_bound(self) -> None:
        """Over max_bytes: drop the oldest segments (never the one being written), count the
        results no sink had yet taken, and move the cursors that were inside them."""
        with self._lock:
            total = sum(s.size for s in self._segments)
            if total <= self.max_bytes or len(self._segments) < 2:
                return
            dropped_segments = []
            lost = 0
            while total > self.max_bytes and len(self._segments) > 1:
                slowest = self._slowest_next_seq()
                seg = self._pop_oldest()
                after = self._firsts[0]
                lost += after - min(max(seg.first_seq, slowest), after)  # what some sink had not taken
                total -= seg.size
                dropped_segments.append(seg)
            self.dropped += lost
            dropped_total = self.dropped
        self._unlink(dropped_segments)
        if lost:
            try:
                write_atomic(os.path.join(self.folder, "stats"), msgspec.json.encode(_Stats(dropped_total)))
            except OSError as e:  # only the count after a restart
                log.error("outbox: cannot save the dropped count: %s", e)
            self._log_drop(lost, len(dropped_segments), total, dropped_total)

    def _log_drop(self, lost: int, segments: int, total: int, dropped_total: int) -> None:
        now = time.monotonic()
        quiet = now - self._drop_burst_at >= DROP_LOG_QUIET
        self._drop_burst_at = now
        if not quiet:
            self._dropped_unlogged += lost
            return
        earlier = self._dropped_unlogged
        self._dropped_unlogged = 0
        log.warning("outbox over its bound of %d bytes: dropped the %d oldest segment(s) with %d undelivered "
                    "results (%d bytes left, %d dropped in all%s); further drops in this burst are only counted",
                    self.max_bytes, segments, lost, total, dropped_total,
                    f", {earlier} since the last warning" if earlier else "")

    # -- stats ---------------------------------------------------------------------------

    def pending(self, sink: str) -> int:
        with self._lock:
            return self._next_seq - self._cursors[sink].next_seq

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._next_seq

    def stats(self) -> dict:
        with self._lock:
            sinks = {}
            for name, cursor in self._cursors.items():
                pending = self._next_seq - cursor.next_seq
                sinks[name] = {"pending": pending, "oldest_pending_seq": cursor.next_seq if pending else None}
            return {
                "outbox_results": self._next_seq - self._slowest_next_seq(),
                "outbox_bytes": sum(s.size for s in self._segments),
                "dropped": self.dropped,
                "sinks": sinks,
            }

    def _segment(self, first_seq: int) -> _Segment | None:
        i = bisect.bisect_left(self._firsts, first_seq)
        if i < len(self._firsts) and self._firsts[i] == first_seq:
            return self._segments[i]
        return None

    def close(self) -> None:
        if getattr(self, "_unsaved", None):
            self.save_cursors()
        for attr in ("_fd", "_lock_fd"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, attr, -1)

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_records(fd: int, offset: int, end: int, first_seq: int, max_records: int, max_bytes: int,
                  have_some: bool) -> tuple[list[tuple[int, bytes]], list[int], str]:
    """Records from `offset` up to `end` (exclusive), reading about 1 MiB at a time, up to
    `max_bytes` of payload (at least one record unless the caller `have_some` already).
    Returns (records, end offset of each, problem found or "")."""
    records: list[tuple[int, bytes]] = []
    ends: list[int] = []
    taken = 0
    seq = first_seq
    chunk = b""
    chunk_at = offset  # file offset of chunk[0]
    pos = offset
    while pos < end and len(records) < max_records and (taken < max_bytes or not (records or have_some)):
        rel = pos - chunk_at
        if len(chunk) - rel < HEADER.size:
            chunk = os.pread(fd, min(_READ_CHUNK, end - pos), pos)
            chunk_at, rel = pos, 0
            if len(chunk) < HEADER.size:
                return records, ends, "short record header"
        length, crc = HEADER.unpack_from(chunk, rel)
        if length == 0:  # never written: a zeroed block
            return records, ends, "zero-length record"
        if pos + HEADER.size + length > end:
            return records, ends, "record runs past the committed end"
        if rel + HEADER.size + length <= len(chunk):
            payload = chunk[rel + HEADER.size:rel + HEADER.size + length]
        else:
            payload = os.pread(fd, length, pos + HEADER.size)
            if len(payload) < length:
                return records, ends, "short record payload"
        if zlib.crc32(payload) != crc:
            return records, ends, "CRC mismatch"
        pos += HEADER.size + length
        records.append((seq, payload))
        ends.append(pos)
        taken += length
        seq += 1
    return records, ends, ""
