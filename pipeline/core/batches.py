"""The shape every batch loop shares: read and decode a batch's inputs on a few threads, then run the models
once per distinct image, passing in what is already known about it.

`item scan` (files), feature extraction (dataset samples) and the worker (checks) each loop over batches of
their own items and keep their own records; these are the steps they have in common. A bad input is a typed
error for its own item, never for the batch.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from pipeline.core.defaults import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from pipeline.core.errors import ItemError
from pipeline.core.imaging import DecodedImage, decode_image
from pipeline.core.media import FrameRule
from pipeline.core.pdq import pdq_of
from pipeline.core.provenance import ProvenanceReader
from pipeline.core.results import Artifacts

T = TypeVar("T")
R = TypeVar("R")
# Reading (disk, network) and decoding (Pillow) release the GIL, so a few threads overlap them; more would only
# compete with the models for the CPU.
READ_THREADS = min(4, os.cpu_count() or 1)


def batched(items: Sequence[T], size: int) -> Iterator[list[T]]:
    """`items` in consecutive batches of at most `size`."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


@dataclass
class Input(Generic[T]):
    """One item of a batch on its way to the models: its bytes, then its image, or the error that stopped it."""

    item: T
    data: bytes | None = None
    sha256: str | None = None  # of `data`: known before decoding, so stored answers can spare the decode
    image: DecodedImage | None = None
    error: ItemError | None = None
    ms: float = 0.0  # reading and decoding time

    @property
    def ok(self) -> bool:
        return self.error is None


class Reader:
    """Reads and decodes the inputs of batches, a few at a time on threads.

    Only `ItemError`s become an input's error: anything else (the database behind a stored image is down, a
    bug) is raised, as it would be from a plain loop.
    """

    def __init__(
        self,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        transform: Callable | None = None,
        threads: int = READ_THREADS,
        provenance: ProvenanceReader | None = None,
        frames: FrameRule | None = None,
        perceptual_hash: bool = False,
    ):
        # frames: how animations and videos are sampled (`pipeline.core.media`); None: judged as today (an
        # animation on its first frame, a video refused)
        self.limits = {"max_pixels": max_pixels, "max_bytes": max_bytes, "frames": frames}
        self.perceptual_hash = perceptual_hash  # a still image's PDQ hash (`pipeline.core.pdq`), here on the threads
        self.transform = transform  # applied to each decoded image (a perturbation, a re-encoding)
        self.provenance = provenance  # reads what each image's original bytes declare; None: not read
        self.threads = threads

    def read(self, items: Sequence[T], read: Callable[[T], bytes]) -> list[Input[T]]:
        """Each item's bytes, as `read` gives them (or its error)."""
        inputs = [Input(item) for item in items]
        self._each(lambda one: self._read_one(one, read), inputs)
        return inputs

    def decode(self, inputs: Sequence[Input[T]]) -> list[Input[T]]:
        """Decodes the inputs read without error (their bytes are then dropped); returns `inputs`."""
        self._each(self._decode_one, [one for one in inputs if one.ok and one.image is None])
        return list(inputs)

    def load(self, items: Sequence[T], read: Callable[[T], bytes]) -> list[Input[T]]:
        """Reads and decodes each item: `read`, then `decode`."""
        return self.decode(self.read(items, read))

    def _each(self, work: Callable[[Input], None], inputs: list[Input]) -> None:
        if len(inputs) <= 1 or self.threads <= 1:
            for one in inputs:  # in the caller's thread, where a time limit can interrupt it
                work(one)
            return
        pool = ThreadPoolExecutor(max_workers=min(self.threads, len(inputs)), thread_name_prefix="item-read")
        try:
            list(pool.map(work, inputs))  # re-raises what a read raised
        finally:
            # Not waiting: a read left hanging when its batch ran out of time ends by its own time limit, and
            # must not hold a thread the next batch needs.
            pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _read_one(one: Input, read: Callable) -> None:
        started = time.perf_counter()
        try:
            one.data = read(one.item)
            one.sha256 = hashlib.sha256(one.data).hexdigest()
        except ItemError as error:
            one.error = error
        one.ms += (time.perf_counter() - started) * 1000

    def _decode_one(self, one: Input) -> None:
        started = time.perf_counter()
        try:
            image = decode_image(one.data, **self.limits)
            still = image.kind == "image"
            if self.provenance is not None and still:  # from the original bytes, never from a re-encoded copy
                image = replace(image, provenance=self.provenance.read(one.data, image.format))
            if self.perceptual_hash and still:  # of the pixels as uploaded, before any transform
                image = replace(image, **dict(zip(("pdq", "pdq_quality"), pdq_of(image.image), strict=True)))
            if self.transform is not None:
                image = _transformed(image, self.transform)
            one.image = image
        except ItemError as error:
            one.error = error
        one.data = None  # the pixels are what the models need; the bytes can be large
        one.ms += (time.perf_counter() - started) * 1000


def _transformed(image: DecodedImage, transform: Callable) -> DecodedImage:
    return replace(image, image=transform(image.image))


def once_per_image(
    run: Callable[[list[DecodedImage | None], list[Artifacts | None]], list[R]],
    images: dict[str, DecodedImage | None],
    known: dict[str, Artifacts],
) -> dict[str, R]:
    """`run` (the detector's `detect` or `analyze`) on each distinct image once, by sha256, with what is known of
    it; the same bytes twice in a batch cost one run. An image may be None where `known` holds its features."""
    shas = list(images)
    if not shas:
        return {}
    results = run([images[sha] for sha in shas], [known.get(sha) for sha in shas])
    return dict(zip(shas, results, strict=True))
