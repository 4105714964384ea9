"""The GPU benchmark's smoke run: every phase runs on the CPU with tiny shapes, and the totals add up."""

import json

from tests.bench import bench_gpu


def test_every_phase_runs_and_is_recorded_as_it_ends(tmp_path):
    summary = bench_gpu.main(["--smoke", "--out", str(tmp_path)])
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


def test_a_phase_that_does_not_fit_the_budget_is_skipped_with_a_note(tmp_path):
    run = bench_gpu.Run(tmp_path, budget_s=5, smoke=False, device=bench_gpu.torch.device("cpu"))
    record = run.phase("blip2", 170, lambda: {"never": "run"})
    assert "needs ~170 s" in record["skipped"] and "never" not in record
    assert json.loads((tmp_path / "results.jsonl").read_text())["phase"] == "blip2"
