"""Training hands freed heap back to the OS only above a resident-set budget: on full-size slides RSS creeps
past the 4 GB target without it, and on small frames each trim cost 6% of a CPU step for nothing."""

from __future__ import annotations

import ctypes

import pytest

import trainer.train_segmenter as ts


class _Libc:
    def __init__(self) -> None:
        self.trims = 0

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1


def test_trims_only_above_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = _Libc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    rss = iter([100.0, 2900.0, 3199.0, 3300.0, 3100.0, 4000.0])
    monkeypatch.setattr(ts, "_resident_mb", lambda: next(rss))
    trim = ts._malloc_trimmer(above_mb=3200)               # first read only checks that /proc works
    trim()
    trim()
    assert libc.trims == 0                                 # small frames: the working set stays resident
    trim()
    trim()
    trim()
    assert libc.trims == 2                                 # crept over the budget: given back


def test_no_libc_means_no_trimming(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise OSError(name)

    monkeypatch.setattr(ctypes, "CDLL", missing)
    ts._malloc_trimmer()()                                 # a no-op, not an error


def test_the_resident_set_is_read_from_proc() -> None:
    import resource

    now = ts._resident_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert 10 < now <= peak + 1                            # MB, and never above this process's peak
