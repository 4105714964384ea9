"""What a stage's precision changes: the same images through a stage at fp32 and at another precision.

    python -m tests.bench.bench_precision --profile small-random --n 4 --size 512 --device cpu \
        --variant ground=bf16 --variant embed=bf16 [--json]

Each variant changes one stage and is fed the fp32 run's artifacts from the stages before it, so the figures are
that stage's own: for grounding, the objects kept (same phrases), the largest box shift in pixels, the mean IoU
of the same phrase's boxes and the largest score change; for CLIP, the relative error of the image and text
embeddings and of the misalignment vector D_g, and the largest |ΔD_g| element; for captions, the share of
captions unchanged. Also the stage's seconds per image at each precision. On a CPU, tf32 and fp16 run as fp32
(see `pipeline.core.devices.effective_precision`): measure those on a GPU.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from pipeline.core.defaults import DEFAULT_MODEL_DIR
from pipeline.core.detector import Detector
from pipeline.core.imaging import decode_image
from pipeline.core.model_store import ModelStore
from pipeline.core.profiles import get_profile
from pipeline.core.results import Artifacts
from tests.bench.bench_pipeline import encoded_images

UPSTREAM = {"caption": (), "ground": ("caption",), "embed": ("caption", "objects")}


def run(args: argparse.Namespace) -> dict:
    store = ModelStore(args.model_dir)
    profile = get_profile(args.profile)
    images = [decode_image(payload) for payload in encoded_images(args.n, args.size)]
    baseline = Detector(profile, store, device=args.device)
    reference, reference_s = _analyze(baseline, images, None)
    report = {"profile": profile.name, "device": str(baseline.device), "n": args.n, "size": args.size, "variants": []}
    for variant in args.variant:
        stage, _, precision = variant.partition("=")
        detector = Detector(profile, store, device=args.device, precision={stage: precision})
        known = [_upstream(analysis.artifacts, stage) for analysis in reference]
        analyses, seconds = _analyze(detector, images, known)
        compare = {"caption": _captions, "ground": _grounding, "embed": _embeddings}[stage]
        report["variants"].append(
            {
                "stage": stage,
                "precision": getattr(detector, _STAGE_ATTRIBUTES[stage]).precision,
                "s_per_image": round(seconds[stage] / args.n, 3),
                "fp32_s_per_image": round(reference_s[stage] / args.n, 3),
                **compare(reference, analyses),
            }
        )
    return report


_STAGE_ATTRIBUTES = {"caption": "captioner", "ground": "grounder", "embed": "embedder"}


def _analyze(detector: Detector, images, known) -> tuple[list, dict[str, float]]:
    detector.load()
    detector.analyze(images[:1], [replace(k) if k else None for k in known[:1]] if known else None)  # warm-up
    started = time.perf_counter()
    analyses = detector.analyze(images, [replace(k) if k else None for k in known] if known else None)
    wall = time.perf_counter() - started
    seconds = {stage: sum(a.timings_ms.get(stage, 0.0) for a in analyses) / 1000 for stage in UPSTREAM}
    seconds["wall"] = wall
    return analyses, seconds


def _upstream(artifacts: Artifacts, stage: str) -> Artifacts:
    """The fp32 run's artifacts from the stages before `stage`: the variant recomputes `stage` and what follows."""
    return Artifacts(**{name: getattr(artifacts, name) for name in UPSTREAM[stage]})


def _captions(reference, analyses) -> dict:
    same = sum(a.artifacts.caption == b.artifacts.caption for a, b in zip(reference, analyses, strict=True))
    return {"captions_unchanged": f"{same}/{len(reference)}"}


def _grounding(reference, analyses) -> dict:
    kept = total = 0
    shifts, ious, score_changes = [], [], []
    for a, b in zip(reference, analyses, strict=True):
        ours = {obj.phrase: obj for obj in b.artifacts.objects}
        for obj in a.artifacts.objects:
            total += 1
            other = ours.get(obj.phrase)
            if other is None:
                continue
            kept += 1
            shifts.append(max(abs(x - y) for x, y in zip(obj.box, other.box, strict=True)))
            ious.append(_iou(obj.box, other.box))
            score_changes.append(abs(obj.score - other.score))
        total += len(set(ours) - {obj.phrase for obj in a.artifacts.objects})  # objects only the variant found
    return {
        "objects_same_phrase": f"{kept}/{total}",
        "max_box_shift_px": round(max(shifts, default=0.0), 2),
        "mean_iou": round(sum(ious) / len(ious), 4) if ious else None,
        "max_score_change": round(max(score_changes, default=0.0), 5),
    }


def _embeddings(reference, analyses) -> dict:
    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x - y).norm() / x.norm().clamp_min(1e-12))

    pairs = list(zip(reference, analyses, strict=True))
    image = [rel(a.artifacts.embeddings.image, b.artifacts.embeddings.image) for a, b in pairs]
    text = [rel(a.artifacts.embeddings.text, b.artifacts.embeddings.text) for a, b in pairs]
    d = [rel(a.artifacts.features.global_, b.artifacts.features.global_) for a, b in pairs]
    d_abs = [float((a.artifacts.features.global_ - b.artifacts.features.global_).abs().max()) for a, b in pairs]
    return {
        "image_embedding_rel_error": round(max(image), 6),
        "text_embedding_rel_error": round(max(text), 6),
        "d_global_rel_error": round(max(d), 6),
        "max_abs_delta_d_global": round(max(d_abs), 6),
    }


def _iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="small-random")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--variant", action="append", default=None, help="STAGE=PRECISION, repeatable.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.variant = args.variant or ["ground=bf16", "embed=bf16"]
    report = run(args)
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['profile']} on {report['device']}, {report['n']} images of {report['size']} px")
    for variant in report["variants"]:
        print(json.dumps(variant))


if __name__ == "__main__":
    main()
