"""Training gives freed heap back to the OS only when the resident set creeps above its early high-water mark:
trimming on a fixed period cost 11% of every CPU step (each step faulted its working set in again)."""

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


def test_trims_only_above_the_warm_up_high_water_mark(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = _Libc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    rss = iter([100.0, 900.0, 1000.0, 800.0, 1100.0, 1260.0, 1300.0, 1000.0, 1257.0])
    monkeypatch.setattr(ts, "_resident_mb", lambda: next(rss))
    trim = ts._malloc_trimmer(above_mb=256, warmup=3)     # first read (100) only checks /proc works
    for _ in range(3):                                     # warm-up: 900, 1000, 800 -> high-water 1000
        trim()
    assert libc.trims == 0
    trim()                                                 # 1100: a step's own working set, kept
    assert libc.trims == 0
    trim()                                                 # 1260: crept past 1000 + 256
    trim()                                                 # 1300
    assert libc.trims == 2
    trim()                                                 # 1000
    trim()                                                 # 1257
    assert libc.trims == 3


def test_no_libc_means_no_trimming(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise OSError(name)

    monkeypatch.setattr(ctypes, "CDLL", missing)
    trim = ts._malloc_trimmer()
    trim()                                                 # a no-op, not an error
