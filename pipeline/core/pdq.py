"""PDQ perceptual hashes (Meta's, as HMA and python-threatexchange use them) and the keys that index them.

A copy of an already-judged image that was re-encoded, resized, slightly cropped or screenshotted keeps its PDQ
hash within a few bits of the original's, so it can be answered from what was already judged. A hash is 32
bytes (256 bits) in python-threatexchange's bit order: its hex is `PdqSignal`'s, so hashes travel to and from HMA
banks unchanged.

The index is multi-index hashing: a hash is cut into `CHUNKS` chunks of 32 bits, each stored as a key (see
`chunk_keys`); two hashes within `max_distance` bits share at least one chunk within `max_distance // CHUNKS`
bits (pigeonhole), so a lookup probes every key within that radius of each chunk (`probe_keys`) and checks the
few rows found by exact Hamming distance.
"""

from __future__ import annotations

from functools import cache
from itertools import combinations

import numpy as np
import pdqhash
from PIL import Image, ImageChops

HASH_BYTES = 32
# Below this quality (0..100) a hash says little of its image (a flat or nearly flat picture): HMA does not match
# on it, and neither do near-copies or the bank (two different flat images hash alike).
MIN_QUALITY = 50
CHUNKS = 8
CHUNK_BITS = 32
# Probes grow as C(32, r) per chunk: r ≤ 2 is 8·(1+32+496) = 4,232 keys a hash; r = 3 would be 47,896.
MAX_PROBE_DISTANCE = CHUNKS * 3 - 1  # 23: the largest distance with r = max_distance // CHUNKS ≤ 2

# A border is the colour of the four corners, within this (per channel, 0..255): JPEG blurs a flat border's
# edge and shifts its colour by a few levels.
BORDER_TOLERANCE = 24
MAX_TRIM = 0.25  # of a side: a flat sky or wall is never cut further than this
MIN_TRIM = 0.03  # of a side: a thinner flat edge is left (see `_cut`); screenshots add 5% and more
# Trimming reads every pixel: a box reduction by a whole factor to at least this side first makes it cheap.
WORK_SIDE = 512
# PDQ's own reduction to 64x64 (Jarosz box filters) gives a different 64x64 for each size of one picture: a copy
# resized by half moved by up to 30 bits on generated images. Every image is first resized (antialiased) to this
# square, so all sizes of a picture reach PDQ alike: then at most 8 bits (tests/bench/bench_pdq.py).
HASH_SIDE = 128


def pdq_of(image: Image.Image) -> tuple[bytes, int]:
    """The PDQ hash of `image` (32 bytes) and its quality (0..100; below 50 HMA does not match on it).

    A uniform border is trimmed first: screenshots and re-renders put the picture on a flat canvas, which moves
    the hash by dozens of bits (the border is part of the 64x64 reduction); trimmed, the copy hashes within a few
    bits of the original. The hash differs from python-threatexchange's of the same image by a few bits (see
    `HASH_SIDE`), well within a match, so HMA's hashes and ours find each other.
    """
    rgb = _trimmed(_reduced(image.convert("RGB"))).resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BILINEAR)
    bits, quality = pdqhash.compute(np.asarray(rgb))
    return packed(bits), int(quality)


def packed(bits: np.ndarray) -> bytes:
    """pdqhash's 256-bit vector as 32 bytes, its first bit the high bit of the first byte (threatexchange's order)."""
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes()


def _reduced(rgb: Image.Image) -> Image.Image:
    factor = min(rgb.size) // WORK_SIDE
    return rgb.reduce(factor) if factor >= 2 else rgb


def _trimmed(rgb: Image.Image) -> Image.Image:
    """`rgb` without a border of one flat colour (its corners'), at most `MAX_TRIM` of each side."""
    width, height = rgb.size
    corners = np.array([rgb.getpixel(xy) for xy in ((0, 0), (width - 1, 0), (0, height - 1), (width - 1, height - 1))])
    if np.ptp(corners, axis=0).max() > BORDER_TOLERANCE:
        return rgb  # corners of different colours: no border all round
    colour = tuple(int(v) for v in np.median(corners, axis=0))
    difference = ImageChops.difference(rgb, Image.new("RGB", rgb.size, colour))
    box = difference.point(lambda v: 255 if v > BORDER_TOLERANCE else 0).getbbox()
    if box is None:
        return rgb  # one flat colour: nothing to trim to
    left, top = _cut(box[0], width), _cut(box[1], height)
    right, bottom = width - _cut(width - box[2], width), height - _cut(height - box[3], height)
    return rgb if (left, top, right, bottom) == (0, 0, width, height) else rgb.crop((left, top, right, bottom))


def _cut(border: int, side: int) -> int:
    """How much of a side's `border` pixels to trim: none under `MIN_TRIM` (a picture whose own edge happens to
    be flat, where JPEG noise alone would decide how much goes, and a copy would lose a different amount), at
    most `MAX_TRIM`."""
    return 0 if border < side * MIN_TRIM else min(border, int(side * MAX_TRIM))


def to_hex(pdq: bytes) -> str:
    """The 64 hex digits python-threatexchange (and HMA) write a PDQ hash as: bit 0 of pdqhash's vector first."""
    return pdq.hex()


def from_hex(text: str) -> bytes:
    if len(text) != 2 * HASH_BYTES:
        raise ValueError(f"a PDQ hash is {2 * HASH_BYTES} hex digits, not {len(text)}")
    return bytes.fromhex(text)


def hamming(a: bytes, b: bytes) -> int:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_count()


def _chunks(pdq: bytes) -> list[int]:
    if len(pdq) != HASH_BYTES:
        raise ValueError(f"a PDQ hash is {HASH_BYTES} bytes, not {len(pdq)}")
    step = CHUNK_BITS // 8
    return [int.from_bytes(pdq[i : i + step], "big") for i in range(0, HASH_BYTES, step)]


def chunk_keys(pdq: bytes) -> list[int]:
    """The `CHUNKS` index keys of a hash: position << 32 | chunk, so equal chunks at different positions differ
    (and every key fits a signed 64-bit integer)."""
    return [position << CHUNK_BITS | chunk for position, chunk in enumerate(_chunks(pdq))]


@cache
def _masks(radius: int) -> tuple[int, ...]:
    return tuple(
        sum(1 << bit for bit in bits) for r in range(radius + 1) for bits in combinations(range(CHUNK_BITS), r)
    )


def probe_keys(pdq: bytes, max_distance: int) -> list[int]:
    """Every key within `max_distance // CHUNKS` bits of one of the hash's chunk keys: a stored hash within
    `max_distance` of `pdq` has at least one of them among its `chunk_keys` (and others may, farther away).
    `max_distance` is limited to 0..`MAX_PROBE_DISTANCE` (at most 4,232 keys a hash)."""
    if not 0 <= max_distance <= MAX_PROBE_DISTANCE:
        raise ValueError(f"max_distance must be 0..{MAX_PROBE_DISTANCE}, not {max_distance}")
    masks = _masks(max_distance // CHUNKS)
    return [position << CHUNK_BITS | (chunk ^ mask) for position, chunk in enumerate(_chunks(pdq)) for mask in masks]
