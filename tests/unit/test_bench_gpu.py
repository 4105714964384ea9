"""The GPU benchmark's smoke run: every phase runs on the CPU with tiny shapes, and the totals add up; the prepared
device check parses, and runs end to end on the CPU in its smoke mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench import bench_gpu

ROOT = Path(__file__).resolve().parents[2]
DEVICE_CHECK = ROOT / "tests" / "bench" / "device_check.sh"


def test_every_phase_runs_and_is_recorded_as_it_ends(tmp_path, model_dir):
    summary = bench_gpu.main(["--smoke", "--out", str(tmp_path), "--model-dir", str(model_dir)])
    phases = [name for name, _, _ in bench_gpu.PHASES]
    assert list(summary["phases"]) == phases
    for name, record in summary["phases"].items():
        assert "error" not in record and "skipped" not in record, (name, record)
    logged = [json.loads(line)["phase"] for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert logged == phases  # appended phase by phase, so a run cut short keeps what it measured
    assert json.loads((tmp_path / "gpu_bench.json").read_text())["totals"] == summary["totals"]

    totals = summary["totals"]
    assert totals["full_ms"] > totals["global_only_ms"] > totals["clip_only_ms"] > 0
    assert totals["full_img_s"] == round(1000 / totals["full_ms"], 1)
    assert set(totals["goals"]) == set(bench_gpu.GOALS)
    assert all(share is not None and share > 0 for share in totals["mfu_of_bf16_gemm"].values())
    grounding = summary["phases"]["grounding"]
    assert all(variant["finite"] for key, variant in grounding.items() if isinstance(variant, dict))


def test_totals_include_the_cpu_preprocessing_of_each_path(tmp_path, model_dir):
    summary = bench_gpu.main(["--smoke", "--out", str(tmp_path), "--model-dir", str(model_dir), "--only", "clip,blip2"])
    assert "no totals" in summary["totals"]["note"]  # no preprocessing measured: no totals to compare with goals

    summary = bench_gpu.main(
        ["--smoke", "--out", str(tmp_path), "--model-dir", str(model_dir), "--only", "preprocess,clip,blip2,grounding"]
    )
    totals = summary["totals"]
    assert totals["includes_preprocessing"] is True
    for path in ("full", "global_only", "clip_only"):
        model, prepared = totals["model_ms"][f"{path}_ms"], totals["preprocess_ms"][f"{path}_ms"]
        assert prepared > 0 and totals[f"{path}_ms"] == pytest.approx(model + prepared, abs=2e-3)
    preprocess = summary["phases"]["preprocess"]
    assert preprocess["jpeg_kb"] > 20  # random-ish photos, not flat images that JPEG squeezes to nothing
    decode_ms = 1000 / preprocess["decode_images_per_s_one_core"]
    assert totals["preprocess_ms"]["full_ms"] > totals["preprocess_ms"]["global_only_ms"] > decode_ms


def test_detect_measures_the_served_detector_at_its_stage_precisions(tmp_path, model_dir):
    summary = bench_gpu.main(
        ["--smoke", "--out", str(tmp_path), "--model-dir", str(model_dir), "--only", "detect,static_cache"]
    )
    detect = summary["phases"]["detect"]
    assert detect["profile"] == "tiny"
    # What each stage serves at on this device (a CPU: fp32; on CUDA the captioner's fp16, tf32 for the others).
    assert detect["precision"] == {"caption": "fp32", "ground": "fp32", "embed": "fp32"}
    for batch in ("b2", "b4"):
        figures = detect[batch]
        assert {"prepare", "caption", "ground", "embed", "head"} <= set(figures["stage_ms_per_img"])
        assert figures["img_s"] == pytest.approx(1000 / figures["ms_per_img"], rel=0.01)
        assert 0 < figures["img_s_with_decode"] < figures["img_s"]
        assert figures["prepared_ahead"]["img_s_bound"] > 0
    served = summary["totals"]["goals"]["served_full_img_s"]
    assert served["measured"] == detect["b4"]["img_s_with_decode"]  # the largest batch measured

    static = summary["phases"]["static_cache"]
    assert static["profile"] == "tiny+static_cache"
    assert static["full"]["images"] == 4 and static["partial"]["images"] == 3  # a full batch, then a partial one
    assert static["partial_over_full_caption"] > 0


def test_a_phase_that_does_not_fit_the_budget_is_skipped_with_a_note(tmp_path):
    run = bench_gpu.Run(tmp_path, budget_s=5, smoke=False, device=bench_gpu.torch.device("cpu"))
    record = run.phase("blip2", 170, lambda: {"never": "run"})
    assert "needs ~170 s" in record["skipped"] and "never" not in record
    assert json.loads((tmp_path / "results.jsonl").read_text())["phase"] == "blip2"


def test_the_device_check_script_parses():
    subprocess.run(["bash", "-n", str(DEVICE_CHECK)], check=True)
    subprocess.run(["bash", "-n", str(ROOT / "tests" / "bench" / "device_wheels.sh")], check=True)


@pytest.mark.slow
def test_the_device_check_runs_in_its_cpu_smoke_mode(tmp_path):
    """The prepared command's own steps on the CPU (tiny profile, 4 JPEGs): the scan, bench_gpu's detect phases,
    the feed benchmark when there is one (its failure is recorded, not fatal), and the summary printed last."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE_CHECK_WORK": str(tmp_path / "work")}
    result = subprocess.run(
        ["bash", str(DEVICE_CHECK), str(out), "--smoke"], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = {row["step"]: row for row in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}
    for name in ("images", "pull-tiny", "scan-tiny", "bench_gpu"):
        assert steps[name]["outcome"] == "ok", steps
    assert steps["bench_feed"]["outcome"] in ("ok", "failed", "timeout", "absent")
    rows = [json.loads(line) for line in (out / "scan-tiny.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(row["error"] is None for row in rows)
    phases = [json.loads(line)["phase"] for line in (out / "gpu" / "results.jsonl").read_text().splitlines()]
    assert "detect" in phases and "static_cache" in phases
    log = (out / "log.txt").read_text()
    assert log.index("==================== summary") > log.index("=== bench_gpu")  # the summary comes last
    assert "scan tiny: 4 scored, 0 errors" in log
    # At most 8 files come back from the device, no deeper than two folders.
    files = [path for path in out.rglob("*") if path.is_file()]
    assert len(files) <= 8 and all(len(path.relative_to(out).parts) <= 3 for path in files)
