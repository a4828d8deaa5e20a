"""Atomically written files get the mode any other new file would (``0o666 & ~umask``), or 0600 when asked."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from wbc_core import atomic
from wbc_core.atomic import PRIVATE, atomic_torch_save, atomic_write_bytes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after the test sets it."""
    old = os.umask(0o022)
    os.umask(old)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path: Path, umask: None, mask: int, expected: int) -> None:
    os.umask(mask)
    assert atomic.current_umask() == mask
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    atomic_torch_save({"x": 1}, tmp_path / "sub" / "b.pt")
    assert mode_of(tmp_path / "a.json") == expected
    assert mode_of(tmp_path / "sub" / "b.pt") == expected
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"")
    assert mode_of(plain) == expected  # the same as a file opened the ordinary way
    assert not list(tmp_path.rglob(".*.tmp"))  # no temporary file left behind


def test_private_mode_whatever_the_umask(tmp_path: Path, umask: None) -> None:
    os.umask(0o002)
    atomic_write_bytes(tmp_path / "secret.yaml", b"token: x\n", mode=PRIVATE)
    atomic_torch_save({"x": 1}, tmp_path / "secret.pt", mode=PRIVATE)
    assert mode_of(tmp_path / "secret.yaml") == 0o600 and mode_of(tmp_path / "secret.pt") == 0o600


def test_replacing_a_file_gives_the_new_mode(tmp_path: Path, umask: None) -> None:
    os.umask(0o022)
    path = tmp_path / "bundle.yaml"
    atomic_write_bytes(path, b"a", mode=PRIVATE)
    atomic_write_bytes(path, b"b")
    assert path.read_bytes() == b"b" and mode_of(path) == 0o644


def test_umask_fallback_when_proc_is_unavailable(tmp_path: Path, umask: None) -> None:
    """Without /proc the umask read at import is used (here: the one a fresh interpreter started with)."""
    script = ("import os, stat, sys; from wbc_core import atomic; "
              "atomic.current_umask = lambda: atomic._UMASK_AT_IMPORT; "
              "atomic.atomic_write_bytes(sys.argv[1], b'x'); print(oct(stat.S_IMODE(os.stat(sys.argv[1]).st_mode)))")
    for mask, expected in ((0o027, "0o640"), (0o077, "0o600")):
        os.umask(mask)  # inherited by the child
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"f{mask:o}")], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == expected
