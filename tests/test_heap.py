"""The heap trimmer: trims when the resident size has grown by its slack since the last trim, and only then."""

import sys

import pytest

from pipeline_core import heap


class FakeProcess:
    """A resident size the test moves by hand; malloc_trim brings it back to `live`."""

    def __init__(self, resident: int, live: int):
        self.resident, self.live, self.trims = resident, live, 0

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        self.resident = self.live
        return 1


def test_trims_after_the_first_batch_then_only_past_the_slack(monkeypatch):
    process = FakeProcess(resident=500, live=400)
    monkeypatch.setattr(heap, "resident_bytes", lambda: process.resident)
    trimmer = heap.HeapTrimmer(slack_bytes=100)
    trimmer.malloc_trim = process.malloc_trim

    trimmer.after_batch()  # the first batch sets the floor
    assert (process.trims, trimmer.floor) == (1, 400)
    process.resident = 500  # grown by exactly the slack: kept
    trimmer.after_batch()
    assert process.trims == 1
    process.resident = 501  # past it: trimmed, and the floor follows what is really live
    process.live = 450
    trimmer.after_batch()
    assert (process.trims, trimmer.floor) == (2, 450)


def test_does_nothing_without_malloc_trim_or_proc(monkeypatch):
    monkeypatch.setattr(heap, "resident_bytes", lambda: None)
    trimmer = heap.HeapTrimmer(slack_bytes=0)
    calls = []
    trimmer.malloc_trim = lambda pad: calls.append(pad)
    trimmer.after_batch()
    trimmer.malloc_trim = None
    trimmer.after_batch()
    assert calls == [] and trimmer.trims == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_resident_bytes_grows_with_touched_memory():
    before = heap.resident_bytes()
    block = b"\x01" * (64 << 20)  # written, so every page is resident
    after = heap.resident_bytes()
    assert before is not None and after - before >= 48 << 20
    del block
