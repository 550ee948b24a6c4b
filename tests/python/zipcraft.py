"""A tiny zip writer with full control over every header field, for hostile-input tests.

Python's zipfile refuses (or quietly fixes) most of what a damaged or malicious archive holds:
duplicate names, non-UTF-8 names, sizes that lie, entries bigger than their data. This writer
takes each entry's stored bytes and declared fields as given and writes exactly that.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

STORED, DEFLATED = 0, 8
DOS_TIME, DOS_DATE = 0, (43 << 9) | (1 << 5) | 1  # 2023-01-01 00:00
UTF8_FLAG = 0x800


def deflate(data: bytes, level: int = 6) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


@dataclass
class Entry:
    name: bytes
    stored: bytes                  # bytes as stored in the archive (compressed when DEFLATED)
    method: int = DEFLATED
    crc: int = 0
    size: int = 0                  # declared uncompressed size
    csize: int | None = None       # declared compressed size (default: len(stored))
    flags: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def of(cls, name, data: bytes, method: int = DEFLATED, **kw) -> "Entry":
        if isinstance(name, str):
            name = name.encode()
        stored = deflate(data) if method == DEFLATED else data
        e = cls(name=name, stored=stored, method=method, crc=zlib.crc32(data), size=len(data))
        for k, v in kw.items():
            setattr(e, k, v)
        return e


def build(entries: list[Entry], zip64: bool = False) -> bytes:
    """The archive's bytes: local headers + data, central directory, end records."""
    out = bytearray()
    central = bytearray()
    for e in entries:
        offset = len(out)
        csize = len(e.stored) if e.csize is None else e.csize
        version = 45 if zip64 else 20
        if zip64:
            local_extra = struct.pack("<HHQQ", 1, 16, e.size, csize)
            cd_extra = struct.pack("<HHQQQ", 1, 24, e.size, csize, offset)
            l_size = l_csize = 0xFFFFFFFF
            cd_offset = 0xFFFFFFFF
        else:
            local_extra = cd_extra = b""
            l_size, l_csize, cd_offset = e.size, csize, offset
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, version, e.flags, e.method, DOS_TIME,
                           DOS_DATE, e.crc, l_csize, l_size, len(e.name), len(local_extra))
        out += e.name + local_extra + e.stored
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | version, version,
                               e.flags, e.method, DOS_TIME, DOS_DATE, e.crc, l_csize, l_size,
                               len(e.name), len(cd_extra), 0, 0, 0, 0o100644 << 16, cd_offset)
        central += e.name + cd_extra
    cd_start = len(out)
    out += central
    n = len(entries)
    if zip64:
        z64_start = len(out)
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, len(central),
                           cd_start)
        out += struct.pack("<IIQI", 0x07064B50, 0, z64_start, 1)
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF,
                           0xFFFFFFFF, 0)
    else:
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(central), cd_start, 0)
    return bytes(out)


def zeros_deflate_stream(total: int, chunk: int = 1 << 26) -> bytes:
    """A raw deflate stream that inflates to `total` zero bytes, built without compressing them
    all: one full-flushed block of `chunk` zeros, repeated (a full flush resets the window)."""
    assert total % chunk == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH)
    return block * (total // chunk) + c.flush()
