"""Dataset feature extraction: model loading, a cold extraction, a cached one, against `Detector.analyze` alone.

Run on demand, never as a timed test:
    python tests/bench/bench_features.py --profile tiny --per-class 32 --batch-size 16 --device cpu

Writes a synthetic benchmark-layout set (2 generators x real/fake x per-class PNGs) to a temporary folder, then:
the seconds each stage takes to load; `Detector.analyze` on the decoded images (the models alone, warm); a cold
`extract` into an empty cache (reading, hashing, decoding and caching on top of the models); and a cached
`extract` with a fresh detector and cache object, as a second process would see it (it should load no model).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pipeline.core.defaults import DEFAULT_MODEL_DIR
from pipeline.core.detector import Detector
from pipeline.core.imaging import decode_image
from pipeline.core.model_store import ModelStore
from pipeline.core.profiles import get_profile
from pipeline.lab.datasets import load_dataset
from pipeline.lab.features import DiskCache, extract
from pipeline.lab.synthetic import write_benchmark


def run(args: argparse.Namespace) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="item-bench-features-"))
    samples = load_dataset(write_benchmark(folder / "data", per_class=args.per_class)).samples
    store = ModelStore(args.model_dir)

    detector = Detector(get_profile(args.profile), store, device=args.device)
    detector.load()
    loads = {
        stage.name: round(stage.load_seconds, 2) for stage in (detector.captioner, detector.grounder, detector.embedder)
    }

    images = [decode_image(sample.path.read_bytes()) for sample in samples]
    analyze_s = _timed(
        lambda: [detector.analyze(images[i : i + args.batch_size]) for i in range(0, len(images), args.batch_size)]
    )
    cold_s = _timed(lambda: extract(samples, detector, DiskCache(folder / "cache"), batch_size=args.batch_size))

    fresh = Detector(get_profile(args.profile), store, device=args.device)
    cached_s = _timed(lambda: extract(samples, fresh, DiskCache(folder / "cache"), batch_size=args.batch_size))
    models_loaded = [stage.name for stage in (fresh.captioner, fresh.grounder, fresh.embedder) if stage.loaded]
    return {
        "profile": args.profile,
        "device": str(detector.device),
        "images": len(samples),
        "batch_size": args.batch_size,
        "load_s": loads,
        "analyze_s": round(analyze_s, 3),
        "extract_cold_s": round(cold_s, 3),
        "extract_cached_s": round(cached_s, 3),
        "overhead_cold": round(cold_s / analyze_s - 1, 3),
        "models_loaded_when_cached": models_loaded,
    }


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--per-class", type=int, default=32, help="Images per generator and class.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"  {key:<28} {value}")


if __name__ == "__main__":
    main()
