"""The simulated device: a benchmark instrument that stands in for a GPU, never a way to score anything.

The `sim` profile runs every piece of host work the paper profile runs (decoding, the one downscale, the real
image processors at their real sizes, tokenizers, crop geometry, batching, copying results back) and replaces
each model call by holding this process's device for the time the paper's model would take on an H100 for that
many images. Holding sleeps, which releases the GIL as a CUDA synchronisation does, so the worker's other
threads run meanwhile exactly as they would beside a real GPU. It answers "does the service keep a GPU busy, and
what does each image cost in CPU outside the device" on any machine (`tests/bench/bench_feed.py`).

One device per process, as one GPU per GPU loop: a lock makes the stages of one process queue for it.

This module imports no torch, so the settings can validate the times without loading a model library.
"""

from __future__ import annotations

import threading
import time

# Milliseconds per image at the physical limit of an H100 at 50% of its bf16 peak (shared/GPU.md §3):
# BLIP-2 = EVA ViT-g 1.32 + Q-Former 0.03 + OPT prefill 0.42 + 30 decode steps at B=64 0.69; Grounding DINO-B at
# the 800-pixel canvas 2.0; CLIP ViT-L/14 per picture (the image and each object's crop) 0.41; per text 0.03.
# With 4 objects an image holds the device 2.46 + 2.0 + 5 × 0.41 + 5 × 0.03 = 6.66 ms: ≈150 images a second.
DEVICE_MS = {"caption": 2.46, "ground": 2.0, "embed_image": 0.41, "embed_text": 0.03}
SIMULATED_MARK = "simulated"  # in every stage version of the `sim` profile, and in its results' verdict reason


class SimulatedDevice:
    """A device timeline, as CUDA's stream is one: work is launched without waiting (it starts when the work before
    it ends), and the host waits only when it synchronises, as copying a result back to the CPU does. Counts how
    long the device was busy."""

    def __init__(self, device_ms: dict[str, float] | None = None):
        self.device_ms = {**DEVICE_MS, **(device_ms or {})}
        self._lock = threading.Lock()
        self._free_at = 0.0  # time.perf_counter() at which the work launched so far ends
        self._busy_s = 0.0

    def launch(self, part: str, items: int) -> None:
        """Queues `items` × the part's time of work; returns at once."""
        seconds = self.device_ms[part] * items / 1000
        with self._lock:
            self._free_at = max(self._free_at, time.perf_counter()) + seconds
            self._busy_s += seconds

    def synchronize(self) -> None:
        """Waits, with the GIL released, until the work launched so far has ended."""
        wait = self._free_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)

    def hold(self, part: str, items: int) -> None:
        """Runs `items` × the part's time of work and waits for it: a model whose outputs the host needs at once."""
        self.launch(part, items)
        self.synchronize()

    @property
    def busy_s(self) -> float:
        """Seconds of work launched on the device since this process started."""
        return self._busy_s

    def per_image_ms(self, objects: int) -> float:
        """What one image with `objects` grounded objects holds the device for."""
        t = self.device_ms
        return t["caption"] + t["ground"] + (1 + objects) * (t["embed_image"] + t["embed_text"])


_device = SimulatedDevice()


def device() -> SimulatedDevice:
    """This process's simulated device."""
    return _device


def configure(device_ms: dict[str, float] | None) -> SimulatedDevice:
    """Sets this process's simulated times (ITEM_SIMULATED_DEVICE_MS over DEVICE_MS); returns its device."""
    global _device
    _device = SimulatedDevice(device_ms)
    return _device
