"""The host's work per upload before the models, as it was and as it is, in one process on the same JPEGs.

Run on demand, never as a timed test:
    python -m tests.bench.bench_host_prep --n 32 --repeat 5 --json

For the paper profile's inputs (the `sim` profile's folders hold the paper models' processors and tokenizers), on
1024×768 JPEGs, one thread (`torch.set_num_threads(1)`), the two paths taking turns so a noisy machine slows both:
  before  decode (Pillow; EXIF transpose and RGB conversion each copying the image), Lanczos downscale to 800
          (Pillow), BLIP-2's and Grounding DINO's transformers image processors on the host (float32 out; the
          grounder's on the letterboxed 800² canvas), CLIP's pixel copy (numpy);
  after   the detector's own: `decode_image`, `downscale` (torchvision's uint8 bicubic), `Detector.prepare` (each
          stage's host half: uint8 resize or letterbox into one batch tensor; normalising is left to the device).
Prints CPU milliseconds per image of each step (median of `--repeat` rounds) and the ratio of the totals.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.core.detector import Detector, untrained_head
from pipeline.core.imaging import decode_image, downscale, letterbox
from pipeline.core.model_store import ModelStore
from pipeline.core.profiles import get_profile
from tests.bench.bench_feed import jpeg, machine


def timed(step) -> tuple[float, object]:
    started = time.process_time()
    result = step()
    return (time.process_time() - started) * 1000, result


def before(detector: Detector, payloads: list[bytes]) -> dict[str, float]:
    ms: dict[str, float] = {}

    def decode():
        images = []
        for data in payloads:
            image = Image.open(io.BytesIO(data))
            image.load()
            images.append(ImageOps.exif_transpose(image).convert("RGB"))
        return images

    ms["decode"], images = timed(decode)
    side = detector.max_side
    lanczos = Image.Resampling.LANCZOS
    ms["downscale"], staged = timed(
        lambda: [image.resize(_side_to(image.size, side), lanczos, reducing_gap=3.0) for image in images]
    )
    blip = detector.captioner.processor.image_processor
    ground = detector.grounder.processor.image_processor
    canvas = int(detector.grounder.params["canvas"])
    ms["caption_inputs"], _ = timed(lambda: blip(images=staged, return_tensors="pt"))
    ms["ground_inputs"], _ = timed(
        lambda: ground(
            images=[letterbox(image) for image in staged],
            size={"shortest_edge": canvas, "longest_edge": canvas},
            return_tensors="pt",
        )
    )
    ms["embed_inputs"], _ = timed(lambda: [torch.from_numpy(np.array(image)) for image in staged])
    return ms


def _side_to(size: tuple[int, int], side: int) -> tuple[int, int]:
    factor = side / max(size)
    return max(1, round(size[0] * factor)), max(1, round(size[1] * factor))


def after(detector: Detector, payloads: list[bytes]) -> dict[str, float]:
    ms: dict[str, float] = {}
    ms["decode"], images = timed(lambda: [decode_image(data) for data in payloads])
    side = detector.max_side
    ms["downscale"], staged = timed(lambda: [downscale(image.image, side) for image in images])
    pixels = [image.pixels for image in staged]
    ms["caption_inputs"], _ = timed(lambda: detector.captioner.prepare(pixels))
    ms["ground_inputs"], _ = timed(lambda: detector.grounder.prepare(pixels))
    ms["embed_inputs"], _ = timed(lambda: detector.embedder.prepare(pixels))
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="JPEGs per round.")
    parser.add_argument("--repeat", type=int, default=5, help="Rounds; each step's median is reported.")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/item-models"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    detector = Detector(get_profile("sim"), ModelStore(args.model_dir, allow_download=False), device="cpu")
    detector.use_head(untrained_head(detector))
    detector.load()
    payloads = [jpeg(i, (1024, 768)) for i in range(args.n)]
    rounds = {"before": [], "after": []}
    after(detector, payloads[:2]), before(detector, payloads[:2])  # warm-up
    for _ in range(args.repeat):
        rounds["before"].append(before(detector, payloads))
        rounds["after"].append(after(detector, payloads))
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "n": args.n,
        "repeat": args.repeat,
    }
    for path, measured in rounds.items():
        steps = {step: statistics.median(r[step] for r in measured) / args.n for step in measured[0]}
        result[path] = {**{step: round(ms, 2) for step, ms in steps.items()}, "total": round(sum(steps.values()), 2)}
    result["ratio_before_over_after"] = round(result["before"]["total"] / result["after"]["total"], 2)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
