"""Agent logs under their cap: two files of at most half the cap each, the newest
output kept, never a moment without LOG, and tails that read across both."""

from __future__ import annotations

import threading
from pathlib import Path

from spoke.logs import ROTATION_NOTE, LogWriter, read_tail, rotated


def lines(first: int, count: int) -> bytes:
    return b"".join(f"line {i:05d}\n".encode() for i in range(first, first + count))


def test_without_a_cap_everything_is_kept(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    writer = LogWriter(log, 0)
    writer.write(lines(0, 5000))
    writer.close()
    assert log.read_bytes() == lines(0, 5000) and not rotated(log).exists()


def test_at_the_cap_the_newest_output_is_kept_in_two_halves(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    cap = 4096
    writer = LogWriter(log, cap)
    for first in range(0, 3000, 7):  # writes of every size, across the rotations
        writer.write(lines(first, 7))
        assert log.stat().st_size <= cap // 2
        assert log.stat().st_size + (rotated(log).stat().st_size
                                     if rotated(log).exists() else 0) <= cap
    writer.close()
    assert log.read_bytes().startswith(ROTATION_NOTE)
    assert log.read_bytes().endswith(lines(2996, 7))
    text, cut = read_tail(log, 10_000)
    # The tail reads across LOG.1 and LOG; the rotation's note is not in its middle.
    assert cut and ROTATION_NOTE.decode() not in text
    kept = text.splitlines()
    numbers = [int(line.split()[1]) for line in kept]
    assert numbers == list(range(numbers[0], 3003)) and len(kept) > 200


def test_a_reader_always_finds_the_log_while_it_rotates(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    writer = LogWriter(log, 2048)
    missing = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            if not log.exists():
                missing.append(1)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for first in range(0, 20000, 10):
            writer.write(lines(first, 10))
    finally:
        stop.set()
        reader.join()
        writer.close()
    assert missing == []


def test_a_short_log_is_read_whole_and_not_marked_cut(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    writer = LogWriter(log, 1 << 20)
    writer.write(lines(0, 3))
    writer.close()
    assert read_tail(log, 10) == (lines(0, 3).decode(), False)
    assert read_tail(log, 2) == (lines(1, 2).decode(), True)
    assert read_tail(tmp_path / "missing.log", 10) == ("", False)
