"""Outbox appends per second with durability on, against a raw write+fsync loop.

    python benchmarks/outbox_bench.py [--dir FOLDER] [--seconds PER_CASE]

For each group-commit size (1, 10, 100, 500 records of about 1 KiB) it measures
Outbox.append_many (one fsync per call) and, as the baseline, os.write + os.fsync of the
same framed bytes in the same batches. The ratio ours/baseline is the cost of the outbox
itself; the absolute numbers are the disk's. Run it on the filesystem the state_dir lives
on: on tmpfs fsync is free and the numbers say little.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from supervisor.publisher.outbox import HEADER, Outbox  # noqa: E402

BATCH_SIZES = (1, 10, 100, 500)
RECORD_BYTES = 1024
SECONDS_PER_CASE = 1.5  # 4 sizes x 2 cases x 1.5 s: about 12 s in all


def make_batch(size: int) -> list[bytes]:
    return [os.urandom(RECORD_BYTES // 2).hex().encode() for _ in range(size)]


def bench_outbox(folder: str, batch: list[bytes], seconds: float) -> float:
    # No bound in reach: this measures appends, not drops (a case writes well under 2 GiB).
    with Outbox(folder, max_bytes=1 << 40, sinks=[]) as outbox:
        records = 0
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            outbox.append_many(batch)
            records += len(batch)
    return records / elapsed


def bench_raw(folder: str, batch: list[bytes], seconds: float) -> float:
    framed = b"".join(HEADER.pack(len(p), zlib.crc32(p)) + p for p in batch)
    path = os.path.join(folder, "raw.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        records = 0
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            os.write(fd, framed)
            os.fsync(fd)
            records += len(batch)
            if records % 100_000 < len(batch):  # keep the file (and the disk used) small
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    return records / elapsed


def filesystem_of(path: str) -> str:
    """The filesystem type holding `path`, from /proc/self/mountinfo (best effort)."""
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mount_point = left.split()[4]
                if os.path.realpath(path).startswith(mount_point) and len(mount_point) > len(best):
                    best, kind = mount_point, right.split()[0]
    except OSError:
        pass
    return kind


def default_folder() -> str:
    """The temp folder, unless it is in memory: then this script's folder (on a disk)."""
    temp = tempfile.gettempdir()
    return os.path.dirname(os.path.abspath(__file__)) if filesystem_of(temp) == "tmpfs" else temp


def run(folder: str | None = None, seconds: float = SECONDS_PER_CASE) -> dict:
    """Returns {"filesystem": ..., "cases": [{"batch", "outbox_per_s", "raw_per_s", "ratio"}]}."""
    base = tempfile.mkdtemp(prefix="outbox-bench-", dir=folder or default_folder())
    cases = []
    try:
        for size in BATCH_SIZES:
            batch = make_batch(size)
            ours_dir = os.path.join(base, f"outbox-{size}")
            raw_dir = os.path.join(base, f"raw-{size}")
            os.makedirs(raw_dir)
            ours = bench_outbox(ours_dir, batch, seconds)
            raw = bench_raw(raw_dir, batch, seconds)
            cases.append({"batch": size, "outbox_per_s": round(ours), "raw_per_s": round(raw),
                          "ratio": round(ours / raw, 3)})
            shutil.rmtree(ours_dir)
            shutil.rmtree(raw_dir)
        return {"filesystem": filesystem_of(base), "record_bytes": RECORD_BYTES, "cases": cases}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="folder to benchmark in (default: the temp folder unless it is tmpfs)")
    parser.add_argument("--seconds", type=float, default=SECONDS_PER_CASE, help="seconds per case")
    args = parser.parse_args()
    result = run(args.dir, args.seconds)
    print(f"outbox appends, {result['record_bytes']} B records, fsync per group commit, "
          f"on {result['filesystem']}")
    print(f"{'batch':>6} {'outbox rec/s':>14} {'write+fsync rec/s':>18} {'ours/baseline':>14}")
    for case in result["cases"]:
        print(f"{case['batch']:>6} {case['outbox_per_s']:>14,} {case['raw_per_s']:>18,} {case['ratio']:>14.2f}")


if __name__ == "__main__":
    main()
