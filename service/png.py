"""8-bit maps as PNG files, written directly: the Up row filter and run-length deflate, or stored.

These PNGs are for display, so speed beats size, but the two need not fight: the Up filter (each byte
minus the one above it, one numpy subtraction) turns a smooth map into small numbers, and zlib's
run-length strategy (Z_RLE) codes them about twice as fast as level 1 of the default strategy on the
unfiltered rows, in fewer bytes for photos. Where the PNGs are a small part of a response (next to the
maps' float32 arrays) they are not compressed at all (`compress=False`: deflate's stored blocks, 0.1 ms
against 2 ms for a 256 px RGB map; docs/PERFORMANCE.md, "the thin server"). Pillow and any viewer read
them.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_UP = 2  # PNG filter type 2: each byte minus the byte above it (the first row: minus zero)


def png_bytes(pixels: np.ndarray, compress: bool = True) -> bytes:
    """An 8-bit gray (H, W) or RGB (H, W, 3) array as PNG (Up filter, Z_RLE deflate; or stored, unfiltered)."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    flat = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(height, width * channels)
    rows = np.empty((height, 1 + width * channels), dtype=np.uint8)
    if compress:
        rows[:, 0] = _UP
        rows[0, 1:] = flat[0]
        np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # uint8 wraps: the filter's arithmetic modulo 256
    else:
        rows[:, 0] = 0  # filter "none"
        rows[:, 1:] = flat
    deflate = zlib.compressobj(1 if compress else 0, zlib.DEFLATED, zlib.MAX_WBITS, 8, zlib.Z_RLE)
    data = deflate.compress(rows.data) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    # One join of every part: the pixels are copied once more, not once per chunk and again for the file.
    return b"".join((b"\x89PNG\r\n\x1a\n", *_chunk(b"IHDR", header), *_chunk(b"IDAT", data), *_chunk(b"IEND", b"")))


def _chunk(kind: bytes, data: bytes) -> tuple[bytes, ...]:
    """A chunk's parts: length, type, data, CRC of type and data."""
    return struct.pack(">I", len(data)), kind, data, struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
