"""The GPU benchmark: the paper's architectures at their real sizes (random weights), in one device call.

    python tests/bench/bench_gpu.py --budget-s 470 --out OUT          # on the GPU machine (README, "On a GPU")
    python tests/bench/bench_gpu.py --smoke --out OUT                 # tiny shapes on the CPU (in the suite)

Nothing is downloaded: the models are built on the device from the configs of `pipeline/core/full_size.py`
(tiny.py's with `--smoke`), inputs are random (never zeros). Phases run in order while the budget lasts; a phase
that would not fit is skipped with a note, and each phase's figures are appended to OUT/results.jsonl as soon as
it ends, so a run cut short still returns what it measured. At the end OUT/gpu_bench.json holds every phase plus
the per-image totals, and a short table is printed.

Phases (see ../shared/GPU.md §6 for the plan and the figures they are compared with):
  ceilings   bf16 / tf32 / fp32 GEMM and device copy: what the machine can do
  flops      FLOPs per stage at batch 1 (torch.utils.flop_counter), GD at 800² and 640²
  clip       CLIP ViT-L/14 images (batch 256) and texts in fp32 / tf32 / bf16, drift against fp32, compiled bf16
  blip2      ViT-g + Q-Former, then greedy `generate` of a fixed 20 and 30 tokens at batch 8 / 64 / 256, static cache
  grounding  Grounding DINO base at batch 16, 800² and 640², fp32 / tf32 / bf16 autocast, drift of the logits
  preprocess the CPU side: image processors on 1024×768 images
Totals: ms per image for full (k objects), global-only and CLIP-only with each stage's best variant, projected
images/s, and the goals (full ≥ 100 img/s, global-only ≥ 250 img/s, decode ≥ 50% of the copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.core.devices import compute_precision

GOALS = {"full_img_s": 100.0, "global_only_img_s": 250.0, "decode_share_of_copy": 0.5}
OBJECTS_PER_IMAGE = 4  # k: crops CLIP embeds besides the whole image (the paper's captions name a few objects)


class Run:
    """The budget, the results file, and how a phase is timed, recorded or skipped."""

    def __init__(self, out: Path, budget_s: float, smoke: bool, device: torch.device):
        self.out, self.smoke, self.device = out, smoke, device
        self.deadline = time.monotonic() + budget_s
        self.results: dict[str, dict] = {}
        out.mkdir(parents=True, exist_ok=True)
        self.log = out / "results.jsonl"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def phase(self, name: str, needs_s: float, body: Callable[[], dict]) -> dict:
        """Runs `body` if `needs_s` (its estimate at full size) fits in what is left; records the outcome either way."""
        if not self.smoke and self.left() < needs_s:
            record = {"skipped": f"needs ~{needs_s:.0f} s, {self.left():.0f} s left"}
        else:
            started = time.monotonic()
            try:
                record = body()
            except Exception as error:  # one failed phase must not cost the others
                record = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc(limit=3)}
            record["seconds"] = round(time.monotonic() - started, 1)
            self.empty_cache()
        self.results[name] = record
        with self.log.open("a") as log:
            log.write(json.dumps({"phase": name, **record}) + "\n")
        print(f"[{name}] {json.dumps(record)[:400]}", flush=True)
        return record

    def time_ms(self, fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> dict:
        """Median and p10/p90 of `fn`'s wall time in ms, after warm-up (CUDA events on a GPU)."""
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(1 if self.smoke else repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(self.device)
                samples.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - began) * 1000)
        ordered = sorted(samples)
        return {
            "ms": round(statistics.median(ordered), 3),
            "p10": round(ordered[len(ordered) // 10], 3),
            "p90": round(ordered[-1 - len(ordered) // 10], 3),
        }

    def peak_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)
        return round(peak, 2)

    def empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    reference, other = reference.float(), other.float()
    return float((reference - other).norm() / reference.norm().clamp_min(1e-12))


# ---------------------------------------------------------------------- models (random, on the device)


def build_clip(smoke: bool):
    import open_clip  # carried as a wheel to the GPU machine (README, "On a GPU")

    from pipeline.core import full_size, tiny

    config = tiny.EMBED_MODEL_CFG if smoke else full_size.clip_config("ViT-L-14-quickgelu")
    return open_clip.CLIP(**config).eval(), config["vision_cfg"]["image_size"]


def build_blip2(smoke: bool):
    from transformers import Blip2ForConditionalGeneration

    from pipeline.core import full_size, tiny

    config = tiny.caption_config(600, 599) if smoke else full_size.blip2_opt_config()
    return Blip2ForConditionalGeneration(config).eval(), config.vision_config.image_size


def build_grounding(smoke: bool):
    from transformers import GroundingDinoForObjectDetection

    from pipeline.core import full_size, tiny

    config = tiny.ground_config(1100) if smoke else full_size.grounding_dino_config("base")  # BERT's ids fit
    return GroundingDinoForObjectDetection(config).eval(), config


# ---------------------------------------------------------------------- phases


def ceilings(run: Run) -> dict:
    n = 256 if run.smoke else 8192
    record = {}
    for name, dtype in (("bf16", torch.bfloat16), ("tf32", torch.float32), ("fp32", torch.float32)):
        a = torch.randn(n, n, device=run.device, dtype=dtype)
        b = torch.randn(n, n, device=run.device, dtype=dtype)
        with compute_precision(name, run.device):
            timing = run.time_ms(lambda a=a, b=b: a @ b, repeats=10)
        record[f"gemm_{name}_tflops"] = round(2 * n**3 / timing["ms"] / 1e9, 3)
    size = (8 if run.smoke else 4096) * 2**20
    source = torch.randn(size // 4, device=run.device)
    target = torch.empty_like(source)
    timing = run.time_ms(lambda: target.copy_(source), repeats=10)
    record["copy_gb_s"] = round(2 * size / timing["ms"] / 1e6, 1)  # read + write
    return record


def flops(run: Run) -> dict:
    """FLOPs of one image through each stage, counted by PyTorch as the kernels are dispatched."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:  # with autograd on: the counter's module hooks need it
            fn()
        return round(counter.get_total_flops() / 1e9, 3)

    return {**_clip_flops(run, count), **_blip2_flops(run, count), **_grounding_flops(run, count)}


def _clip_flops(run: Run, count) -> dict:
    clip, size = build_clip(run.smoke)
    image = torch.randn(1, 3, size, size, device=run.device)
    return {
        "clip_image_gflop": count(lambda: clip.encode_image(image)),
        "clip_text_gflop": count(lambda: clip.encode_text(_tokens(1, run.device))),
    }


def _blip2_flops(run: Run, count) -> dict:
    blip, size = build_blip2(run.smoke)
    pixels = torch.randn(1, 3, size, size, device=run.device)
    return {"blip2_vision_qformer_gflop": count(lambda: blip.get_image_features(pixel_values=pixels))}


def _grounding_flops(run: Run, count) -> dict:
    grounder, config = build_grounding(run.smoke)
    record = {}
    for side in _grounding_sides(run.smoke):
        inputs = _grounding_inputs(1, side, config, run.device)
        record[f"grounding_{side}_gflop"] = count(lambda inputs=inputs: grounder(**inputs))
    return record


def clip_phase(run: Run) -> dict:
    clip, size = build_clip(run.smoke)
    clip = clip.to(run.device)
    batch = 8 if run.smoke else 256
    images = torch.randn(batch, 3, size, size, device=run.device)
    texts = _tokens(8 if run.smoke else 320, run.device)
    record, reference = {}, {}
    with torch.inference_mode():
        for name in ("fp32", "tf32", "bf16"):
            with compute_precision(name, run.device):
                image_time = run.time_ms(lambda: clip.encode_image(images))
                text_time = run.time_ms(lambda: clip.encode_text(texts))
                embedded = clip.encode_image(images).float(), clip.encode_text(texts).float()
            reference.setdefault("fp32", embedded)
            record[name] = {
                "images_per_s": round(batch * 1000 / image_time["ms"], 1),
                "texts_per_s": round(len(texts) * 1000 / text_time["ms"], 1),
                "image_ms": image_time,
                "image_embedding_rel_error": relative_error(reference["fp32"][0], embedded[0]),
                "abs_delta_d": _delta_d(reference["fp32"], embedded),
            }
    record["peak_gib"] = run.peak_gib()
    if run.device.type == "cuda" and run.left() > 90:
        compiled = torch.compile(clip.visual)
        with torch.inference_mode(), compute_precision("bf16", run.device):
            timing = run.time_ms(lambda: compiled(images), warmup=2)
        record["bf16_compiled_images_per_s"] = round(batch * 1000 / timing["ms"], 1)
    return record


def blip2_phase(run: Run) -> dict:
    blip, size = build_blip2(run.smoke)
    dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32
    blip = blip.to(run.device, dtype)
    record = {"dtype": str(dtype).removeprefix("torch.")}
    with torch.inference_mode():
        pixels = torch.randn(4 if run.smoke else 128, 3, size, size, device=run.device, dtype=dtype)
        timing = run.time_ms(lambda: blip.get_image_features(pixel_values=pixels))
        record["vision_qformer_images_per_s"] = round(len(pixels) * 1000 / timing["ms"], 1)
        for batch in (2,) if run.smoke else (8, 64, 256):
            for tokens in (3,) if run.smoke else (20, 30):
                images = torch.randn(batch, 3, size, size, device=run.device, dtype=dtype)
                timing = run.time_ms(lambda images=images, tokens=tokens: _generate(blip, images, tokens), repeats=3)
                prefill = run.time_ms(lambda images=images: _generate(blip, images, 1), repeats=3)
                step_ms = max(timing["ms"] - prefill["ms"], 1e-6) / max(tokens - 1, 1)
                record[f"generate_b{batch}_t{tokens}"] = {
                    "images_per_s": round(batch * 1000 / timing["ms"], 2),
                    "ms": timing,
                    "prefill_ms": prefill["ms"],
                    "ms_per_step": round(step_ms, 3),
                    "weight_gb_s": round(_decoder_bytes(blip) / step_ms / 1e6, 1),
                }
        if run.device.type == "cuda" and run.left() > 150:
            record["static_b64_t30"] = _static_generate(run, blip, size, dtype)
    record["peak_gib"] = run.peak_gib()
    return record


def grounding_phase(run: Run) -> dict:
    grounder, config = build_grounding(run.smoke)
    grounder = grounder.to(run.device)
    batch = 2 if run.smoke else 16
    record = {}
    with torch.inference_mode():
        for side in _grounding_sides(run.smoke):
            inputs = _grounding_inputs(batch, side, config, run.device)
            reference = None
            for name in ("fp32", "tf32", "bf16"):
                with compute_precision(name, run.device):
                    timing = run.time_ms(lambda inputs=inputs: grounder(**inputs), repeats=3)
                    # Logits past the prompt's length are -inf by design (padding up to max_text_len).
                    logits = grounder(**inputs).logits.float()[..., : inputs["input_ids"].shape[1]]
                reference = logits if reference is None else reference
                record[f"{side}_{name}"] = {
                    "images_per_s": round(batch * 1000 / timing["ms"], 1),
                    "ms": timing,
                    "finite": bool(torch.isfinite(logits).all()),
                    "logits_rel_error": relative_error(reference, logits),
                }
    record["peak_gib"] = run.peak_gib()
    return record


def preprocess_phase(run: Run) -> dict:
    import numpy as np
    from PIL import Image
    from transformers import BlipImageProcessor, GroundingDinoImageProcessor

    count = 4 if run.smoke else 64
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)) for _ in range(count)]
    processors = {
        "blip2_224": BlipImageProcessor(size={"height": 224, "width": 224}),
        "grounding_800": GroundingDinoImageProcessor(size={"shortest_edge": 800, "longest_edge": 800}),
    }
    try:
        import open_clip

        clip_transform = open_clip.image_transform(224, is_train=False)
        processors["clip_224"] = lambda images, return_tensors: [clip_transform(image) for image in images]
    except ImportError:
        pass  # recorded as absent: the environment phase says open_clip is missing
    record = {}
    for name, processor in processors.items():
        began = time.perf_counter()
        processor(images=images, return_tensors="pt")
        record[f"{name}_images_per_s_one_core"] = round(count / (time.perf_counter() - began), 1)
    return record


# ---------------------------------------------------------------------- totals


def totals(results: dict) -> dict:
    """Per-image cost of each path from the best measured variant of each stage, and the goals."""
    clip = results.get("clip", {})
    blip = results.get("blip2", {})
    grounding = results.get("grounding", {})
    image_s = _best(clip, "images_per_s")
    text_s = _best(clip, "texts_per_s")
    caption_s = _best(_largest(blip, "generate_", "_t"), "images_per_s")  # the longest captions measured
    ground_s = _best(_largest(grounding, "", "_", first=True), "images_per_s")  # the largest canvas measured
    if not all((image_s, text_s, caption_s, ground_s)):
        return {"note": "a stage was not measured; no totals"}
    per_image = {
        "clip_only_ms": 1000 / image_s,
        "global_only_ms": 1000 / caption_s + 1000 / image_s + 1000 / text_s,
        "full_ms": 1000 / caption_s + 1000 / ground_s + (1 + OBJECTS_PER_IMAGE) * (1000 / image_s + 1000 / text_s),
    }
    record = {key: round(value, 3) for key, value in per_image.items()}
    record.update({key.replace("_ms", "_img_s"): round(1000 / value, 1) for key, value in per_image.items()})
    copy = results.get("ceilings", {}).get("copy_gb_s")
    decode = blip.get("generate_b64_t30", {}).get("weight_gb_s")
    goals = {
        "full_img_s": record["full_img_s"],
        "global_only_img_s": record["global_only_img_s"],
        "decode_share_of_copy": round(decode / copy, 3) if decode and copy else None,
    }
    record["goals"] = {
        key: {"measured": value, "goal": GOALS[key], "met": value is not None and value >= GOALS[key]}
        for key, value in goals.items()
    }
    record["mfu_of_bf16_gemm"] = _utilisation(results, image_s, ground_s)
    record["peak_gib"] = {name: results.get(name, {}).get("peak_gib") for name in ("clip", "blip2", "grounding")}
    return record


def _utilisation(results: dict, image_s: float, ground_s: float) -> dict:
    """Achieved FLOP/s (counted FLOPs × measured rate) as a share of the measured bf16 GEMM ceiling."""
    flops = results.get("flops", {})
    ceiling = results.get("ceilings", {}).get("gemm_bf16_tflops")
    sides = [int(key.split("_")[1]) for key in flops if key.startswith("grounding_") and key.endswith("_gflop")]

    def share(gflop: float | None, per_s: float) -> float | None:
        return round(gflop * per_s / (ceiling * 1000), 4) if gflop and ceiling else None

    return {
        "clip_image": share(flops.get("clip_image_gflop"), image_s),
        "grounding": share(flops.get(f"grounding_{max(sides)}_gflop") if sides else None, ground_s),
    }


# ---------------------------------------------------------------------- helpers


def _tokens(batch: int, device: torch.device) -> torch.Tensor:
    return torch.randint(1, 49_000, (batch, 77), device=device)


def _delta_d(reference: tuple[torch.Tensor, torch.Tensor], other: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Largest |ΔD| of the global misalignment (1 - cosine of image and text), pairing rows in order."""

    def d(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        rows = min(len(images), len(texts))
        return 1 - torch.nn.functional.cosine_similarity(images[:rows], texts[:rows])

    return float((d(*reference) - d(*other)).abs().max())


def _grounding_sides(smoke: bool) -> tuple[int, ...]:
    return (96,) if smoke else (800, 640)


def _grounding_inputs(batch: int, side: int, config, device: torch.device) -> dict:
    """A prompt shaped like the grounder's: [CLS] phrase . phrase . [SEP] in BERT's ids, the words random."""
    cls, sep, dot = 101, 102, 1012  # Grounding DINO finds the phrases by these ids
    words = (
        torch.randint(2000, config.text_config.vocab_size, (batch, 6), device=device)
        if not _tiny_vocab(config)
        else torch.randint(200, 1000, (batch, 6), device=device)
    )
    column = torch.full((batch, 1), 0, device=device)
    ids = torch.cat([column + cls, words[:, :3], column + dot, words[:, 3:], column + dot, column + sep], dim=1)
    return {
        "pixel_values": torch.randn(batch, 3, side, side, device=device),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
    }


def _tiny_vocab(config) -> bool:
    return config.text_config.vocab_size < 2000


def _generate(model, images: torch.Tensor, tokens: int, **extra) -> torch.Tensor:
    """Greedy decoding of exactly `tokens` new tokens: random weights never stop by themselves."""
    return model.generate(pixel_values=images, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, **extra)


def _decoder_bytes(model) -> int:
    """Bytes of weights one decode step reads: the language model's."""
    return sum(p.numel() * p.element_size() for p in model.language_model.parameters())


def _static_generate(run: Run, model, size: int, dtype: torch.dtype) -> dict:
    images = torch.randn(64, 3, size, size, device=run.device, dtype=dtype)
    extra = {"cache_implementation": "static"}
    timing = run.time_ms(lambda: _generate(model, images, 30, **extra), repeats=3, warmup=2)
    return {"images_per_s": round(64 * 1000 / timing["ms"], 2), "ms": timing}


def _largest(variants: dict, prefix: str, separator: str, first: bool = False) -> dict:
    """The variants whose number (`generate_b64_t30` → 30 with "_t"; `800_bf16` → 800 with first=True) is largest."""

    def number(key: str) -> int | None:
        if not key.startswith(prefix):
            return None
        part = key[len(prefix) :].split(separator)[0] if first else key.rsplit(separator, 1)[-1]
        return int(part) if part.isdigit() else None

    numbered = {key: number(key) for key in variants if number(key) is not None}
    top = max(numbered.values(), default=None)
    return {key: variants[key] for key, value in numbered.items() if value == top}


def _best(variants: dict, key: str) -> float | None:
    values = [v[key] for v in variants.values() if isinstance(v, dict) and v.get(key)]
    return max(values) if values else None


def _environment(device: torch.device) -> dict:
    import platform

    import transformers

    record = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import open_clip

        record["open_clip"] = open_clip.__version__
    except ImportError:
        record["open_clip"] = None
    return record


def _print_table(summary: dict) -> None:
    print("\nphase        outcome")
    for name, record in summary["phases"].items():
        outcome = record.get("skipped") or record.get("error") or f"done in {record.get('seconds')} s"
        print(f"{name:12s} {outcome}")
    for key, value in summary["totals"].get("goals", {}).items():
        print(f"{key:22s} measured {value['measured']}  goal {value['goal']}  {'met' if value['met'] else 'NOT met'}")


# (phase, seconds it needs at full size on an H200, estimated from ../shared/GPU.md §6)
PHASES = (
    ("ceilings", 15, ceilings),
    ("flops", 40, flops),
    ("clip", 90, clip_phase),
    ("blip2", 170, blip2_phase),
    ("grounding", 60, grounding_phase),
    ("preprocess", 20, preprocess_phase),
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Folder for results.jsonl and gpu_bench.json.")
    parser.add_argument("--budget-s", type=float, default=470.0, help="Stop starting phases after this long.")
    parser.add_argument("--smoke", action="store_true", help="Tiny shapes, on the CPU: checks the script runs.")
    parser.add_argument("--device", default=None, help="Default: cuda when there is one, else cpu.")
    parser.add_argument("--only", default=None, help="Comma-separated phases to run (default: all).")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    run = Run(args.out, args.budget_s, args.smoke, device)
    torch.manual_seed(0)
    environment = _environment(device)
    print(json.dumps(environment), flush=True)
    wanted = set(args.only.split(",")) if args.only else {name for name, _, _ in PHASES}
    with torch.device(device):  # weights and buffers are created on the device, not copied there
        for name, needs_s, body in PHASES:
            if name in wanted:
                run.phase(name, needs_s, lambda body=body: body(run))
    summary = {"environment": environment, "phases": run.results, "totals": totals(run.results)}
    (args.out / "gpu_bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_table(summary)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
