"""Reading images out of a zip in place: the archive's directory is parsed once per version of the
file, and each member's bytes are read through a plain file handle, bounded in size (a small member
must not inflate to gigabytes), so every thread and loader worker can keep its own handle."""
from __future__ import annotations

import functools
import os
import struct
import zipfile
import zlib
from typing import BinaryIO

from ..images import ImageError

MAX_MEMBER_BYTES = 512 * 2**20  # an image inside a zip: more than any image within the pixel limit needs

ZipEntry = tuple[int, int, int, int]  # (local header offset, compressed size, compression, CRC-32)


def zip_members(archive: str) -> dict[str, zipfile.ZipInfo]:
    """Member name -> ZipInfo, parsed once per archive version (60,000 entries take a second).
    Raises OSError or zipfile.BadZipFile when the archive cannot be read."""
    st = os.stat(archive)
    return _zip_index(os.path.realpath(archive), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _zip_index(archive: str, mtime_ns: int, size: int) -> dict[str, zipfile.ZipInfo]:
    with zipfile.ZipFile(archive) as zf:
        return {info.filename: info for info in zf.infolist()}


def zip_entry(info: zipfile.ZipInfo) -> ZipEntry:
    """What `read_member` needs to find a member again without the archive's directory."""
    return info.header_offset, info.compress_size, info.compress_type, info.CRC


def read_member(fp: BinaryIO, entry: ZipEntry, archive: str, name: str) -> bytes:
    """One member's bytes through a plain file handle, so every thread or worker can have its own
    handle without re-parsing the archive's directory. Raises zipfile.BadZipFile when damaged,
    ImageError when the member is larger than MAX_MEMBER_BYTES."""
    offset, size, method, crc = entry
    if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        with zipfile.ZipFile(archive) as zf:  # rare compressions: the slow, general way
            if zf.getinfo(name).file_size > MAX_MEMBER_BYTES:  # zipfile reads no more than it declares
                raise ImageError(f"{archive}:{name}", _member_too_large())
            return zf.read(name)
    fp.seek(offset)
    head = fp.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {name}")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    fp.seek(offset + 30 + name_len + extra_len)
    data = fp.read(min(size, MAX_MEMBER_BYTES + 1))
    if len(data) > MAX_MEMBER_BYTES:
        raise ImageError(f"{archive}:{name}", _member_too_large())
    if method == zipfile.ZIP_DEFLATED:  # bounded: a small member must not inflate to gigabytes (a zip bomb)
        inflate = zlib.decompressobj(-15)
        data = inflate.decompress(data, MAX_MEMBER_BYTES + 1)
        if len(data) > MAX_MEMBER_BYTES:
            raise ImageError(f"{archive}:{name}", _member_too_large())
    if zlib.crc32(data) != crc:
        raise zipfile.BadZipFile(f"CRC mismatch in {name}")
    return data


def _member_too_large() -> str:
    return f"too large (more than {MAX_MEMBER_BYTES // 2**20} MB uncompressed)"
