"""The GPU benchmark: the paper's architectures at their real sizes (random weights), in one device call.

    python tests/bench/bench_gpu.py --budget-s 470 --out OUT          # on the GPU machine (README, "On a GPU")
    python tests/bench/bench_gpu.py --smoke --out OUT                 # tiny shapes on the CPU (in the suite)

Nothing is downloaded: the models are built on the device from the configs of `pipeline/core/full_size.py`
(tiny.py's with `--smoke`), inputs are random (never zeros). Phases run in order while the budget lasts; a phase
that would not fit is skipped with a note, and each phase's figures are appended to OUT/results.jsonl as soon as
it ends, so a run cut short still returns what it measured. At the end OUT/gpu_bench.json holds every phase plus
the per-image totals, and a short table is printed.

Phases (see ../shared/GPU.md §6 for the plan and the figures they are compared with):
  ceilings     bf16 / tf32 / fp32 GEMM and device copy: what the machine can do
  preprocess   the CPU side, one core: JPEG decode, the detector's downscale to 800, the image processors
  detect       what the service sees: `Detector.detect` on decoded JPEGs through the real stages at their served
               precisions (BLIP-2 fp16, Grounding DINO tf32, CLIP tf32 on CUDA), paper-random models from
               --model-dir (tiny with --smoke), an untrained head; per-stage ms/img and img/s at batch 16 and 64
  static_cache the same detector with the captioner's `static_cache` on: a full batch (64) then a partial one
               (40), so a recompilation for the partial batch shows as a much slower one
  blip2        ViT-g + Q-Former, then greedy `generate` of a fixed 20 and 30 tokens at batch 8 / 64 / 256, in fp16
               as served (Q-Former kept in fp32, as `from_pretrained` keeps it), plus one bf16 comparison
  grounding    Grounding DINO base at batch 16, 800² and 640², fp32 / tf32 / bf16 autocast, drift of the logits
  clip         CLIP ViT-L/14 images (batch 256) and texts in fp32 / tf32 / bf16, drift against fp32, compiled bf16
  flops        FLOPs per stage at batch 1 (torch.utils.flop_counter), GD at 800² and 640²
Totals: ms per image for full (k objects), global-only and CLIP-only with each stage's best variant PLUS the
CPU preprocessing of that path (decode, downscale, processors, one core), projected images/s, and the goals
(full ≥ 100 img/s, global-only ≥ 250 img/s, decode ≥ 50% of the copy bandwidth, and the detect phase's
measured end-to-end rate, JPEG decode included, ≥ 100 img/s).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.core.defaults import DEFAULT_MODEL_DIR
from pipeline.core.devices import compute_precision

GOALS = {"full_img_s": 100.0, "global_only_img_s": 250.0, "decode_share_of_copy": 0.5, "served_full_img_s": 100.0}
OBJECTS_PER_IMAGE = 4  # k: crops CLIP embeds besides the whole image (the paper's captions name a few objects)


class Run:
    """The budget, the results file, and how a phase is timed, recorded or skipped."""

    def __init__(
        self,
        out: Path,
        budget_s: float,
        smoke: bool,
        device: torch.device,
        model_dir: Path = DEFAULT_MODEL_DIR,
        profile: str | None = None,
    ):
        self.out, self.smoke, self.device = out, smoke, device
        self.model_dir = Path(model_dir)  # where the detect phases find (or generate) the profile's models
        self.profile = profile or ("tiny" if smoke else "paper-random")
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
        gc.collect()  # a phase's models (a Detector's stages) go with it, before the next phase allocates
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


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
    """BLIP-2 as the captioner serves it: fp16 weights on CUDA with the Q-Former in fp32 (what `from_pretrained`
    does at fp16), float32 products without TF32 (the captioner's `compute_precision`); fp32 on a CPU."""
    blip, size = build_blip2(run.smoke)
    dtype = torch.float16 if run.device.type == "cuda" else torch.float32
    blip = _as_loaded(blip.to(run.device), dtype)
    record = {"dtype": str(dtype).removeprefix("torch."), "fp32_modules": _fp32_modules(blip, dtype)}
    with torch.inference_mode(), compute_precision("fp32", run.device):
        pixels = torch.randn(4 if run.smoke else 128, 3, size, size, device=run.device, dtype=dtype)
        timing = run.time_ms(lambda: blip.get_image_features(pixel_values=pixels))
        record["vision_qformer_images_per_s"] = round(len(pixels) * 1000 / timing["ms"], 1)
        # Batch 64 first: the captioner's batch size, measured even when the budget ends the sweep early.
        for batch in (2,) if run.smoke else (64, 8, 256):
            for tokens in (3,) if run.smoke else (30, 20):
                key = f"generate_b{batch}_t{tokens}"
                if not run.smoke and run.left() < 20:
                    record[key] = {"skipped": f"{run.left():.0f} s left"}
                    continue
                record[key] = _generate_figures(run, blip, batch, tokens, size, dtype)
        # A labelled comparison, not the served figure: bf16 everywhere, as `from_pretrained` loads it at bf16.
        if run.device.type == "cuda" and run.left() > 40:
            blip = blip.to(torch.bfloat16)
            tokens = 30
            figures = _generate_figures(run, blip, 64, tokens, size, torch.bfloat16)
            record["bf16_comparison_b64_t30"] = {"note": "not served: comparison only", **figures}
    record["peak_gib"] = run.peak_gib()
    return record


def _generate_figures(run: Run, blip, batch: int, tokens: int, size: int, dtype: torch.dtype) -> dict:
    images = torch.randn(batch, 3, size, size, device=run.device, dtype=dtype)
    timing = run.time_ms(lambda: _generate(blip, images, tokens), repeats=3)
    prefill = run.time_ms(lambda: _generate(blip, images, 1), repeats=3)
    step_ms = max(timing["ms"] - prefill["ms"], 1e-6) / max(tokens - 1, 1)
    return {
        "images_per_s": round(batch * 1000 / timing["ms"], 2),
        "ms": timing,
        "prefill_ms": prefill["ms"],
        "ms_per_step": round(step_ms, 3),
        "weight_gb_s": round(_decoder_bytes(blip) / step_ms / 1e6, 1),
    }


def _as_loaded(model, dtype: torch.dtype):
    """`model` cast to `dtype` the way `from_pretrained(dtype=...)` leaves it: at fp16 the modules the class keeps
    in float32 (BLIP-2: `query_tokens`, `qformer`) stay float32."""
    model = model.to(dtype)
    if dtype == torch.float16:
        for name in getattr(model, "_keep_in_fp32_modules", None) or ():
            part = getattr(model, name, None)
            if isinstance(part, torch.nn.Parameter):
                part.data = part.data.float()
            elif isinstance(part, torch.nn.Module):
                part.float()
    return model


def _fp32_modules(model, dtype: torch.dtype) -> list[str]:
    names = getattr(model, "_keep_in_fp32_modules", None) or ()
    return sorted(name for name in names if dtype != torch.float32 and hasattr(model, name))


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
    """The CPU work before the models, on one core, on what an upload is: 1024×768 JPEGs decoded as the service
    decodes them, downscaled to the grounder's 800-pixel canvas as the detector does, then each image processor
    on the downscaled image (the grounder's after its letterbox). CLIP's transform is open_clip's PIL one: the
    embedder does the same on the device (`clip_input`), so this is an upper bound for it."""
    import transformers
    from transformers import BlipImageProcessor, GroundingDinoImageProcessor

    from pipeline.core.imaging import decode_image, downscale, letterbox

    count = 4 if run.smoke else 64
    data = _jpeg_bytes(count)
    record = {"images": count, "jpeg_kb": round(sum(map(len, data)) / count / 1024, 1)}

    def rate(name: str, work: Callable[[], object]) -> object:
        began = time.perf_counter()
        result = work()
        record[f"{name}_images_per_s_one_core"] = round(count / (time.perf_counter() - began), 1)
        return result

    decoded = rate("decode", lambda: [decode_image(item).image for item in data])
    staged = rate("downscale_800", lambda: [downscale(image, 800).image for image in decoded])
    grounding = {"grounding_800": GroundingDinoImageProcessor}
    fast = getattr(transformers, "GroundingDinoImageProcessorFast", None)  # transformers < 5.20 names it apart
    if fast is not None and fast is not GroundingDinoImageProcessor:
        grounding["grounding_800_fast"] = fast
    blip = BlipImageProcessor(size={"height": 224, "width": 224})
    rate("blip2_224", lambda: blip(images=staged, return_tensors="pt"))
    record["processors"] = {"blip2_224": type(blip).__name__}
    for name, kind in grounding.items():
        processor = kind(size={"shortest_edge": 800, "longest_edge": 800})
        rate(name, lambda processor=processor: processor(images=[letterbox(i) for i in staged], return_tensors="pt"))
        record["processors"][name] = kind.__name__
    try:
        import open_clip

        clip_transform = open_clip.image_transform(224, is_train=False)
        rate("clip_224", lambda: [clip_transform(image) for image in staged])
    except ImportError:
        pass  # recorded as absent: the environment says open_clip is missing
    return record


def detect_phase(run: Run) -> dict:
    """`Detector.detect` as the service calls it: decoded JPEGs through the real stages at the precisions they are
    served at (each stage's `default_precision`), the profile's models from the model folder, an untrained head.
    Per batch size: a warm-up batch, then timed batches (the stages copy their results back to the CPU, which
    waits for the GPU; the clock also synchronises). Per-stage ms/img come from the detections' `timings_ms`."""
    from pipeline.core.imaging import decode_image
    from pipeline.core.model_store import ModelStore
    from pipeline.core.profiles import get_profile

    profile = get_profile(run.profile)
    sizes = (2, 4) if run.smoke else (16, 64)
    data = _jpeg_bytes(max(sizes))
    began = time.perf_counter()
    images = [decode_image(item) for item in data]
    decode_ms = (time.perf_counter() - began) * 1000 / len(data)
    record: dict = {"profile": profile.name, "decode_ms_per_img_one_core": round(decode_ms, 2)}
    with torch.device("cpu"):  # no default device, as in the service: the stages place their own tensors
        detector, record["load_s"] = _loaded_detector(run, profile, ModelStore(run.model_dir, allow_download=False))
        record["precision"] = {stage.name: stage.precision for stage in _stages(detector)}
        record["batch_size"] = {stage.name: stage.configured_batch_size for stage in _stages(detector)}
        for batch in sizes:
            needs = 10 if batch <= 16 else 25  # a warm-up and two timed batches of paper-random on an H100 (guess)
            if not run.smoke and run.left() < needs:
                record[f"b{batch}"] = {"skipped": f"needs ~{needs} s, {run.left():.0f} s left"}
                continue
            detector.detect(images[:batch])  # warm-up: first use of this batch size's shapes
            record[f"b{batch}"] = _timed_detect(run, detector, images[:batch], decode_ms, repeats=2, ahead=True)
    record["peak_gib"] = run.peak_gib()
    return record


def static_cache_phase(run: Run) -> dict:
    """Caption decoding with a static KV cache (spec param `static_cache`: the captioner pads each `generate` batch
    to a fixed bucket so a partial batch does not recompile), through `Detector.detect`. A full batch compiles
    (first_full), then full, partial and partial again are timed: a partial batch much slower than a full one
    means it recompiled."""
    from dataclasses import replace

    from pipeline.core.imaging import decode_image
    from pipeline.core.model_store import ModelStore
    from pipeline.core.profiles import Profile, get_profile

    base = get_profile(run.profile)
    full, partial = (4, 3) if run.smoke else (64, 40)
    caption = replace(base.caption, params={**base.caption.params, "static_cache": True, "batch_size": full})
    description = f"{base.description} Caption decoding with a static cache, batches of {full}."
    profile = Profile(f"{base.name}+static_cache", description, caption, base.ground, base.embed)
    images = [decode_image(item) for item in _jpeg_bytes(full, seed=1)]
    record: dict = {"profile": profile.name, "caption_batch_size": full}
    with torch.device("cpu"):
        detector, record["load_s"] = _loaded_detector(run, profile, ModelStore(run.model_dir, allow_download=False))
        record["precision"] = {stage.name: stage.precision for stage in _stages(detector)}
        for label, count in (("first_full", full), ("full", full), ("partial", partial), ("partial_again", partial)):
            if not run.smoke and label != "first_full" and run.left() < 15:
                record[label] = {"skipped": f"{run.left():.0f} s left"}
                continue
            figures = _timed_detect(run, detector, images[:count], 0.0, repeats=1)
            caption_ms = figures["stage_ms_per_img"].get("caption", 0.0) * count  # the batch's whole caption time
            record[label] = {"images": count, "detect_ms": figures["ms"], "caption_batch_ms": round(caption_ms, 1)}
    full_ms = record.get("full", {}).get("caption_batch_ms")
    partial_ms = record.get("partial", {}).get("caption_batch_ms")
    if full_ms and partial_ms:
        # About 1 when the partial batch reused the full batch's compiled bucket (it is padded to it).
        record["partial_over_full_caption"] = round(partial_ms / full_ms, 2)
    record["peak_gib"] = run.peak_gib()
    return record


def _loaded_detector(run: Run, profile, store) -> tuple:
    """A Detector of `profile` on the run's device with an untrained head, its models loaded (generated first if
    the model folder lacks them); and the seconds that took."""
    from pipeline.core.detector import Detector, untrained_head

    began = time.perf_counter()
    detector = Detector(profile, store, device=str(run.device))
    detector.use_head(untrained_head(detector))
    detector.load()
    return detector, round(time.perf_counter() - began, 1)


def _stages(detector) -> tuple:
    return detector.captioner, detector.grounder, detector.embedder


def _timed_detect(run: Run, detector, images: list, decode_ms: float, repeats: int, ahead: bool = False) -> dict:
    """`detector.detect(images)` timed `repeats` times (once under --smoke): the median run's wall time and its
    per-stage ms/img (`timings_ms`, which splits each stage's batch time over its images), and the rate with the
    JPEG decode added (one core, as measured before). With `ahead`, also as a worker that prepares ahead runs it:
    `prepare` (the host work) timed alone, then `detect` given its result; the rate bound is then set by the
    slower of the two, since a worker prepares the next batch on another thread while the device runs this one."""
    runs = []
    for _ in range(1 if run.smoke else repeats):
        run.synchronize()
        began = time.perf_counter()
        detections = detector.detect(images)
        run.synchronize()
        wall_ms = (time.perf_counter() - began) * 1000
        steps = {name for detection in detections for name in detection.timings_ms}
        stage_ms = {name: sum(d.timings_ms.get(name, 0.0) for d in detections) / len(images) for name in steps}
        objects = sum(detection.object_count for detection in detections) / len(images)
        runs.append((wall_ms, stage_ms, objects))
    runs.sort(key=lambda item: item[0])
    wall_ms, stage_ms, objects = runs[len(runs) // 2]
    per_image = wall_ms / len(images)
    figures = {}
    if ahead:
        began = time.perf_counter()
        prepared = detector.prepare(images)
        prepare_ms = (time.perf_counter() - began) * 1000 / len(images)
        run.synchronize()
        began = time.perf_counter()
        detector.detect(images, prepared=prepared)
        run.synchronize()
        device_ms = (time.perf_counter() - began) * 1000 / len(images)
        figures["prepared_ahead"] = {
            "prepare_ms_per_img": round(prepare_ms, 2),
            "detect_ms_per_img": round(device_ms, 2),
            # decode runs on the reader threads, prepare on the prepare-ahead thread: both off the device's path
            "img_s_bound": round(1000 / max(prepare_ms, device_ms, decode_ms), 2),
        }
    return {
        "images": len(images),
        "ms": round(wall_ms, 1),
        "runs_ms": [round(item[0], 1) for item in runs],
        "img_s": round(1000 / per_image, 2),
        "ms_per_img": round(per_image, 2),
        "stage_ms_per_img": {name: round(value, 2) for name, value in sorted(stage_ms.items())},
        "stages_sum_ms_per_img": round(sum(stage_ms.values()), 2),
        "img_s_with_decode": round(1000 / (per_image + decode_ms), 2),
        "objects_per_img": round(objects, 2),
        **figures,
    }


def _jpeg_bytes(count: int, seed: int = 0, size: tuple[int, int] = (1024, 768)) -> list[bytes]:
    """Uploads as the service receives them: smooth random colour fields (coarse noise, bicubic up) with a fine
    grain, saved as JPEG quality 90. Never zeros, and sized like photos (~100-300 KB), not like flat images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (size[1] // 32, size[0] // 32, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-8, 9, smooth.shape, dtype=np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


# ---------------------------------------------------------------------- totals


def totals(results: dict) -> dict:
    """Per-image cost of each path: the best measured variant of each model stage plus the path's CPU
    preprocessing (one core), and the goals, including the detect phase's measured end-to-end rate."""
    clip = results.get("clip", {})
    blip = results.get("blip2", {})
    grounding = results.get("grounding", {})
    image_s = _best(clip, "images_per_s")
    text_s = _best(clip, "texts_per_s")
    caption_s = _best(_largest(blip, "generate_", "_t"), "images_per_s")  # the longest captions measured
    ground_s = _best(_largest(grounding, "", "_", first=True), "images_per_s")  # the largest canvas measured
    preprocess = _preprocess_ms(results.get("preprocess", {}))
    if not all((image_s, text_s, caption_s, ground_s)) or preprocess is None:
        return {"note": "a stage or the preprocessing was not measured; no totals", "goals": _goals(results, {})}
    model = {
        "clip_only_ms": 1000 / image_s,
        "global_only_ms": 1000 / caption_s + 1000 / image_s + 1000 / text_s,
        "full_ms": 1000 / caption_s + 1000 / ground_s + (1 + OBJECTS_PER_IMAGE) * (1000 / image_s + 1000 / text_s),
    }
    prepared = {
        "clip_only_ms": preprocess["decode"] + preprocess["downscale"] + preprocess["clip"],
        "global_only_ms": preprocess["decode"] + preprocess["downscale"] + preprocess["blip"] + preprocess["clip"],
        "full_ms": sum(preprocess.values()),
    }
    per_image = {key: model[key] + prepared[key] for key in model}
    record = {key: round(value, 3) for key, value in per_image.items()}
    record.update({key.replace("_ms", "_img_s"): round(1000 / value, 1) for key, value in per_image.items()})
    record["includes_preprocessing"] = True
    record["preprocess_ms"] = {key: round(value, 3) for key, value in prepared.items()}
    record["model_ms"] = {key: round(value, 3) for key, value in model.items()}
    record["goals"] = _goals(results, record)
    record["mfu_of_bf16_gemm"] = _utilisation(results, image_s, ground_s)
    record["peak_gib"] = {name: results.get(name, {}).get("peak_gib") for name in ("clip", "blip2", "grounding")}
    return record


def _preprocess_ms(preprocess: dict) -> dict | None:
    """ms per image of each CPU step before the models, one core; None if any was not measured."""

    def ms(*names: str) -> float | None:
        rates = [preprocess.get(f"{name}_images_per_s_one_core") for name in names]
        best = max((rate for rate in rates if rate), default=None)
        return 1000 / best if best else None

    steps = {
        "decode": ms("decode"),
        "downscale": ms("downscale_800"),
        "blip": ms("blip2_224"),
        "grounding": ms("grounding_800", "grounding_800_fast"),
        "clip": ms("clip_224"),
    }
    return None if None in steps.values() else steps


def _served(results: dict) -> dict:
    """The detect phase's largest measured batch: the end-to-end rate the service would see."""
    detect = results.get("detect", {})
    batches = {int(key[1:]): value for key, value in detect.items() if key[:1] == "b" and key[1:].isdigit()}
    measured = {size: value for size, value in batches.items() if isinstance(value, dict) and value.get("img_s")}
    return measured[max(measured)] if measured else {}


def _goals(results: dict, record: dict) -> dict:
    copy = results.get("ceilings", {}).get("copy_gb_s")
    decode = results.get("blip2", {}).get("generate_b64_t30", {}).get("weight_gb_s")
    goals = {
        "full_img_s": record.get("full_img_s"),
        "global_only_img_s": record.get("global_only_img_s"),
        "decode_share_of_copy": round(decode / copy, 3) if decode and copy else None,
        "served_full_img_s": _served(results).get("img_s_with_decode"),
    }
    return {
        key: {"measured": value, "goal": GOALS[key], "met": value is not None and value >= GOALS[key]}
        for key, value in goals.items()
    }


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
    phases, totals_ = summary["phases"], summary["totals"]
    print("\nphase        outcome")
    for name, record in phases.items():
        outcome = record.get("skipped") or record.get("error") or f"done in {record.get('seconds')} s"
        print(f"{name:12s} {outcome}")
    detect = phases.get("detect", {})
    for key, value in detect.items():
        if key[:1] == "b" and isinstance(value, dict) and "img_s" in value:
            stages = "  ".join(f"{name} {ms}" for name, ms in value["stage_ms_per_img"].items())
            print(
                f"detect {detect['profile']} {key}: {value['img_s']} img/s, {value['img_s_with_decode']} with the JPEG"
                f" decode (one core); ms/img: {stages}  [{_precisions(detect)}]"
            )
            ahead = value.get("prepared_ahead")
            if ahead:
                print(
                    f"  prepared ahead (host work on another thread): at most {ahead['img_s_bound']} img/s"
                    f" (prepare {ahead['prepare_ms_per_img']}, detect {ahead['detect_ms_per_img']} ms/img)"
                )
    static = phases.get("static_cache", {})
    if "partial_over_full_caption" in static:
        full, partial = static["full"], static["partial"]
        print(
            f"static cache: caption of {full['images']} {full['caption_batch_ms']} ms, of {partial['images']}"
            f" {partial['caption_batch_ms']} ms (x{static['partial_over_full_caption']}; about 1: no recompilation;"
            f" first batch with compilation {static['first_full']['caption_batch_ms']} ms)"
        )
    if "full_ms" in totals_:
        print("per-image totals = model stages (best variant each) + CPU preprocessing, one core (JPEG decode,")
        print("downscale to 800, image processors): ms model + ms preprocessing = ms -> img/s")
        for path in ("full", "global_only", "clip_only"):
            model, prepared = totals_["model_ms"][f"{path}_ms"], totals_["preprocess_ms"][f"{path}_ms"]
            print(f"  {path:12s} {model} + {prepared} = {totals_[f'{path}_ms']} ms -> {totals_[f'{path}_img_s']} img/s")
    else:
        print(totals_.get("note", "no totals"))
    labels = {
        "full_img_s": "(projected, preprocessing included)",
        "global_only_img_s": "(projected, preprocessing included)",
        "served_full_img_s": "(Detector.detect measured, JPEG decode included)",
    }
    for key, value in totals_.get("goals", {}).items():
        verdict = "met" if value["met"] else "NOT met"
        print(f"{key:22s} measured {value['measured']}  goal {value['goal']}  {verdict} {labels.get(key, '')}")


def _precisions(record: dict) -> str:
    return ", ".join(f"{stage} {precision}" for stage, precision in record.get("precision", {}).items())


# (phase, seconds it needs at full size on an H100/H200, estimated from ../shared/GPU.md §6; detect and
# static_cache guessed: model loads from the model folder, and static_cache's compilation of the decoder)
PHASES = (
    ("ceilings", 15, ceilings),
    ("preprocess", 20, preprocess_phase),
    ("detect", 90, detect_phase),
    ("static_cache", 150, static_cache_phase),
    ("blip2", 170, blip2_phase),
    ("grounding", 60, grounding_phase),
    ("clip", 90, clip_phase),
    ("flops", 40, flops),
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Folder for results.jsonl and gpu_bench.json.")
    parser.add_argument("--budget-s", type=float, default=470.0, help="Stop starting phases after this long.")
    parser.add_argument("--smoke", action="store_true", help="Tiny shapes, on the CPU: checks the script runs.")
    parser.add_argument("--device", default=None, help="Default: cuda when there is one, else cpu.")
    parser.add_argument("--only", default=None, help="Comma-separated phases to run (default: all).")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL_DIR,
        help="The detect phases' model folder: the profile's models are generated there if missing (minutes and"
        " ~17 GB for paper-random: `item models pull --profile paper-random` first, or share `item scan`'s).",
    )
    parser.add_argument(
        "--profile", default=None, help="The detect phases' profile (default: paper-random; tiny with --smoke)."
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    run = Run(args.out, args.budget_s, args.smoke, device, model_dir=args.model_dir, profile=args.profile)
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
