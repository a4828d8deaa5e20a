"""Hostile-server helpers for the stand-in: transforms for ``add_fault("tamper", ...)`` (see
:mod:`tests.cvat_standin.faults`) that turn a faithful answer into a malicious one.

- :func:`set_job_numbers`: a transform for ``GET /api/jobs`` lists that gives one job other ``start_frame`` /
  ``stop_frame`` values (e.g. ``1e10``).
- :func:`edit_meta`: a transform for ``data/meta`` that applies ``fn(meta)``.
- :func:`zip_bomb_export`: a transform for export downloads that swaps one zip member for a deflate stream of
  ``size`` zero bytes (about 1000:1, so 3 GB cost ~3 MB), declaring its true size or a smaller lie.
- :func:`deflate_zeros`, :func:`write_zip`: the building blocks (a raw deflate stream built from one repeated
  full-flush block, so it costs no CPU to make; a zip writer that takes members' raw data and declared sizes
  as given, which :mod:`zipfile` will not do).

Usage::

    cvat.add_fault("tamper", "list", path_contains="/api/jobs", transform=set_job_numbers(job_id, stop=1e10))
    cvat.add_fault("tamper", "download", transform=zip_bomb_export("IMG_0001.jpg", 3 * 2**30))
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PIECE = 1 << 20


def deflate_zeros(size: int) -> bytes:
    """A raw deflate stream (no zlib header) that inflates to ``size`` zero bytes (``size`` a multiple of 1 MiB)."""
    if size % PIECE:
        raise ValueError(f"size must be a multiple of {PIECE}")
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(b"\0" * PIECE) + comp.flush(zlib.Z_FULL_FLUSH)  # self-contained after a full flush
    return block * (size // PIECE) + comp.flush(zlib.Z_FINISH)


@dataclass
class RawMember:
    """One zip member as stored: ``data`` (already compressed for ``method`` 8), the CRC and the uncompressed
    size the headers *declare* (they may lie)."""

    name: str
    data: bytes
    method: int = zipfile.ZIP_STORED
    crc: int | None = None        # None: the CRC of ``data`` (right for stored members)
    file_size: int | None = None  # None: len(data) (right for stored members)


def write_zip(members: list[RawMember]) -> bytes:
    """A zip holding ``members`` with exactly the sizes and CRCs given (local headers agree with the central
    directory). No zip64: every size must fit in 32 bits."""
    out = io.BytesIO()
    central = []
    dos_time, dos_date = 0, (2024 - 1980) << 9 | 1 << 5 | 1
    for m in members:
        name = m.name.encode("utf-8")
        crc = zlib.crc32(m.data) if m.crc is None else m.crc
        size = len(m.data) if m.file_size is None else m.file_size
        flags = 0x800  # names are UTF-8
        offset = out.tell()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, m.method, dos_time, dos_date, crc,
                              len(m.data), size, len(name), 0))
        out.write(name)
        out.write(m.data)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, flags, m.method, dos_time, dos_date,
                                   crc, len(m.data), size, len(name), 0, 0, 0, 0, 0o100644 << 16, offset) + name)
    start = out.tell()
    for entry in central:
        out.write(entry)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), out.tell() - start, start, 0))
    return out.getvalue()


def zip_bomb_export(member_suffix: str, size: int, declared: int | None = None) -> Callable[[bytes], bytes]:
    """A ``tamper`` transform for an export download: the member whose name ends with ``member_suffix`` (e.g. a
    frame) becomes ``size`` zero bytes deflated; its headers declare ``declared`` bytes (default: the truth) and
    a CRC of 0 (a real bomb's CRC does not matter: the honest one must be refused before it is inflated, the
    lying one cannot pass its CRC check). The other members are kept, stored."""
    bomb = deflate_zeros(size)

    def transform(body: bytes) -> bytes:
        members = []
        hit = False
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            for info in zf.infolist():
                if not hit and info.filename.endswith(member_suffix):
                    hit = True
                    members.append(RawMember(info.filename, bomb, zipfile.ZIP_DEFLATED, crc=0,
                                             file_size=size if declared is None else declared))
                else:
                    members.append(RawMember(info.filename, zf.read(info)))
        if not hit:
            raise ValueError(f"the export has no member ending with {member_suffix!r}")
        return write_zip(members)

    return transform


def set_job_numbers(job_id: int, **values: Any) -> Callable[[Any], Any]:
    """A ``tamper`` transform for job lists (``GET /api/jobs``) and job details: job ``job_id`` reports
    ``values`` instead (``start_frame=-5``, ``stop_frame=1e10``, ...)."""

    def transform(data: Any) -> Any:
        jobs = data.get("results", []) if isinstance(data, dict) and "results" in data else [data]
        for job in jobs:
            if isinstance(job, dict) and job.get("id") == job_id:
                job.update(values)
        return data

    return transform


def edit_meta(fn: Callable[[dict], None]) -> Callable[[Any], Any]:
    """A ``tamper`` transform for ``GET .../data/meta``: ``fn(meta)`` edits the decoded body in place."""

    def transform(data: Any) -> Any:
        fn(data)
        return data

    return transform


__all__ = ["RawMember", "deflate_zeros", "edit_meta", "set_job_numbers", "write_zip", "zip_bomb_export"]
