"""In-process pipeline throughput: N generated images through decode → caption → ground → embed → head.

Run on demand, never as a timed test:
    python tests/bench/bench_pipeline.py --profile tiny --n 64 --batch-size 8 --device cpu
    python tests/bench/bench_pipeline.py --profile small-random --n 16 --batch-size 4 --size 1024 --device cpu
    python tests/bench/bench_pipeline.py --profile paper --n 256 --batch-size 16 --device cuda   # with weights

Prints the seconds each stage's model took to generate (random profiles, first run only) and to load, the
process's peak RSS, then per-stage milliseconds per image and images per second, warm (models loaded before
timing), and optionally JSON for the README's performance table. A profile without a trained head (the random
ones) runs with an untrained one: its scores mean nothing either way.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import resource
import time

import torch

from pipeline.core.defaults import DEFAULT_MODEL_DIR
from pipeline.core.detector import Detector, untrained_head
from pipeline.core.imaging import decode_image
from pipeline.core.model_store import ModelStore
from pipeline.core.profiles import get_profile
from pipeline.lab.synthetic import FAMILIES, make_image


def encoded_images(n: int, size: int) -> list[bytes]:
    images = []
    for index in range(n):
        image = make_image(FAMILIES[index % 2], index).resize((size, size))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    detector = Detector(get_profile(args.profile), ModelStore(args.model_dir), device=args.device)
    located_s = time.perf_counter() - started  # generating missing random models, or finding present ones
    detector.use_head(untrained_head(detector))
    detector.load()
    stages = (detector.captioner, detector.grounder, detector.embedder)
    load_s = {stage.name: round(stage.load_seconds or 0.0, 2) for stage in stages}
    payloads = encoded_images(args.n, args.size)
    detector.detect([decode_image(p) for p in payloads[: args.batch_size]])  # warm-up: kernels, allocator
    _sync(detector.device)

    totals: dict[str, float] = {}
    started = time.perf_counter()
    for start in range(0, args.n, args.batch_size):
        t0 = time.perf_counter()
        batch = [decode_image(p) for p in payloads[start : start + args.batch_size]]
        decode_ms = (time.perf_counter() - t0) * 1000 / len(batch)
        for detection in detector.detect(batch):
            for stage, ms in {"decode": decode_ms, **detection.timings_ms}.items():
                totals[stage] = totals.get(stage, 0.0) + ms
    _sync(detector.device)
    wall = time.perf_counter() - started
    return {
        "profile": args.profile,
        "device": _device_name(detector.device),
        "n": args.n,
        "batch_size": args.batch_size,
        "image_size": args.size,
        "images_per_second": round(args.n / wall, 2),
        "generate_or_locate_s": round(located_s, 2),
        "load_s": load_s,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "ms_per_image": {stage: round(total / args.n, 2) for stage, total in totals.items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="Side of the square test images, in pixels.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{result['profile']} on {result['device']}: {result['images_per_second']} images/s "
        f"(n={args.n}, batch {args.batch_size}, {args.size}px)"
    )
    print(f"  models: located/generated in {result['generate_or_locate_s']} s, loaded in {result['load_s']} s")
    print(f"  peak RSS {result['peak_rss_gib']} GiB")
    for stage, ms in result["ms_per_image"].items():
        print(f"  {stage:8s} {ms:8.2f} ms/image")


if __name__ == "__main__":
    main()
