"""Image preparation, before and after: full-size images and PIL crops, against one downscale and tensor crops.

Run on demand, never as a timed test:
    python -m tests.bench.bench_prep --profile tiny --n 16 --batch-size 8 --repeat 5 --device cpu
    python -m tests.bench.bench_prep --profile small-random --n 2 --batch-size 2 --repeat 1 --device cpu

Both paths run in the same process on the same decoded images, for each size: `pil`, the detector as it was
(every stage gets the full decoded image, CLIP's crops are cut with PIL and go through open_clip's PIL transform
one by one), re-created here, and `tensor`, the detector as it is. Prints the milliseconds per image of decoding,
of each step the detector times (`prepare` is the downscale, which the old path did not have) and of `detect` as
a whole, measured warm: the median of `--repeat` rounds, the two paths taking turns, so that a noisy machine
slows both alike. The old detector cut its crops before the clock of `embed` started; here the `pil` path
cuts them inside it, so its `embed` is the honest cost and `detect` compares like with like. Also prints how
often the two paths agree on the caption and how close their whole-image embeddings are: the downscale changes
what the models see, a little.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from datetime import UTC, datetime

import torch
from PIL import Image

from pipeline.core.defaults import DEFAULT_MODEL_DIR
from pipeline.core.detector import Detector, untrained_head
from pipeline.core.devices import compute_precision
from pipeline.core.imaging import PAD_COLOR, decode_image
from pipeline.core.model_store import ModelStore
from pipeline.core.profiles import get_profile
from pipeline.core.stages.embed import Embedder
from pipeline.lab.synthetic import FAMILIES, make_image
from tests.bench.bench_pipeline import _device_name, _sync


def pil_square_crop(image: Image.Image, box) -> Image.Image:
    """The PIL crop the detector used before (`imaging.square_crop`)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    region = image.crop((x0, y0, x1, y1))
    side = max(region.width, region.height)
    canvas = Image.new("RGB", (side, side), PAD_COLOR)
    canvas.paste(region, ((side - region.width) // 2, (side - region.height) // 2))
    return canvas


class PilPathEmbedder(Embedder):
    """The embedder as it was: PIL pictures through open_clip's own PIL transform, one at a time."""

    def _load(self) -> None:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        super()._load()
        self.preprocess = image_transform_v2(PreprocessCfg(**self.model.visual.preprocess_cfg), is_train=False)

    @torch.inference_mode()
    def embed_images(self, images, boxes=None) -> torch.Tensor:
        self.load()
        boxes = boxes if boxes is not None else [[] for _ in images]
        pictures = [p for image, own in zip(images, boxes, strict=True) for p in (image, *self._crops(image, own))]
        with compute_precision(self.precision, self.device):
            parts = self.in_runs(pictures, lambda part: [self._encode(part)])
        return torch.cat(parts).float().cpu() if parts else torch.empty(0, self.dim)

    def _crops(self, image, boxes):
        return [pil_square_crop(image, box) for box in boxes]

    def _encode(self, pictures) -> torch.Tensor:
        return self.model.encode_image(torch.stack([self.preprocess(p) for p in pictures]).to(self.device))


def pil_path(detector: Detector) -> Detector:
    """`detector` turned back into the old path: no downscale, PIL crops."""
    detector.max_side = None  # every image is within no limit: the stages get the decoded image itself
    old = detector.embedder
    detector.embedder = PilPathEmbedder(old.located, old.device, old.params.get("precision"))
    return detector


def encoded_images(n: int, width: int, height: int) -> list[bytes]:
    payloads = []
    for index in range(n):
        image = make_image(FAMILIES[index % 2], index).resize((width, height))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        payloads.append(buffer.getvalue())
    return payloads


def measure(detector: Detector, payloads: list[bytes], batch_size: int) -> tuple[dict, list]:
    """Milliseconds per image of decoding, of each timed step and of `detect`; and the detections."""
    totals: dict[str, float] = {"decode": 0.0, "detect": 0.0}
    detections = []
    for start in range(0, len(payloads), batch_size):
        started = time.perf_counter()
        batch = [decode_image(p) for p in payloads[start : start + batch_size]]
        decoded = time.perf_counter()
        found = detector.detect(batch)
        _sync(detector.device)
        totals["decode"] += (decoded - started) * 1000
        totals["detect"] += (time.perf_counter() - decoded) * 1000
        for detection in found:
            for stage, ms in detection.timings_ms.items():
                totals[stage] = totals.get(stage, 0.0) + ms
        detections += found
    return {stage: total / len(payloads) for stage, total in totals.items()}, detections


def median_rounds(paths: dict[str, Detector], payloads: list[bytes], args: argparse.Namespace) -> tuple[dict, dict]:
    """Per path, the median milliseconds per image of each step over the rounds; and the last round's detections."""
    for detector in paths.values():
        detector.detect([decode_image(payloads[0])])  # warm-up at this size: kernels, allocator, caches
    rounds: dict[str, list[dict]] = {name: [] for name in paths}
    detections = {}
    for _ in range(args.repeat):
        for name, detector in paths.items():
            timings, detections[name] = measure(detector, payloads, args.batch_size)
            rounds[name].append(timings)
    medians = {
        name: {step: round(statistics.median(r[step] for r in runs), 1) for step in runs[0]}
        for name, runs in rounds.items()
    }
    return medians, detections


def agreement(old: list, new: list) -> dict:
    captions = sum(a.caption == b.caption for a, b in zip(old, new, strict=True)) / len(old)
    cosines = [
        float(torch.nn.functional.cosine_similarity(a.artifacts.embeddings.image, b.artifacts.embeddings.image, dim=0))
        for a, b in zip(old, new, strict=True)
    ]
    return {"same_caption": round(captions, 2), "image_cosine_min": round(min(cosines), 4)}


def run(args: argparse.Namespace) -> dict:
    store = ModelStore(args.model_dir)
    paths = {}
    for name in ("pil", "tensor"):
        detector = Detector(get_profile(args.profile), store, device=args.device)
        detector = pil_path(detector) if name == "pil" else detector
        detector.use_head(untrained_head(detector))
        detector.load()
        paths[name] = detector
    result = {
        "profile": args.profile,
        "device": _device_name(paths["tensor"].device),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "n": args.n,
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        "max_side": paths["tensor"].max_side,
        "sizes": {},
    }
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        timings, detections = median_rounds(paths, encoded_images(args.n, width, height), args)
        result["sizes"][size] = {**timings, "agreement": agreement(detections["pil"], detections["tensor"])}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--n", type=int, default=16, help="Images per size.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="Rounds per size; the median is reported.")
    parser.add_argument("--sizes", nargs="+", default=["1024x768", "3000x2000"], help="WIDTHxHEIGHT, one or more.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (fewer than the cores: steadier figures).")
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{result['profile']} on {result['device']}, {result['date']}: n={args.n} per size, batch {args.batch_size}, "
        f"median of {args.repeat}, images downscaled to {result['max_side']} px"
    )
    steps = ("decode", "prepare", "caption", "ground", "embed", "head", "detect")
    for size, figures in result["sizes"].items():
        print(f"  {size}  ms/image  " + " ".join(f"{step:>8s}" for step in steps))
        for name in ("pil", "tensor"):
            row = " ".join(f"{figures[name].get(step, 0.0):8.1f}" for step in steps)
            print(f"  {'':9s} {name:8s}  {row}")
        print(f"  {'':9s} agreement: {figures['agreement']}")


if __name__ == "__main__":
    main()
