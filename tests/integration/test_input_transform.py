"""No train/serve skew: a head trained on re-encoded inputs scores the same image the same way in `item eval`,
`item scan` and a real `item worker`, because the detector applies the head's input transform wherever it scores.
"""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from pipeline.core.head import Head
from pipeline.lab.synthetic import write_benchmark
from tests.integration.stack import Worker, make_stack, run_item
from tests.integration.test_cli import env as env  # noqa: F401  (the module fixture: tiny models, offline)

pytestmark = pytest.mark.slow
TRANSFORM = "jpeg:40"  # strong enough that scoring without it gives other numbers


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("skew")
    write_benchmark(root / "train", ("gen-a",), per_class=6, seed=0)
    write_benchmark(root / "test", ("gen-a",), per_class=2, seed=1)
    lab_env = {**env, "ITEM_FEATURE_DIR": str(root / "cache"), "ITEM_PROFILE": "tiny"}
    args = ("train", str(root / "train"), "--out", str(root / "head"), "--hidden", "16", "--epochs", "5")
    summary = json.loads(run_item(lab_env, *args, "--reencode", TRANSFORM, "--json").stdout)
    return root, lab_env, summary


def _eval_scores(lab_env, root, head) -> dict[str, float]:
    args = ("eval", str(root / "test"), "--head", str(head), "--out", str(root / "eval"), "--no-plots", "--json")
    run_item(lab_env, *args)
    with (root / "eval" / "scores.csv").open() as handle:
        return {row["path"].rsplit("/", 1)[-1]: float(row["p_fake"]) for row in csv.DictReader(handle)}


def _scan_scores(lab_env, paths, head) -> dict[str, float]:
    result = run_item(lab_env, "scan", "--head", str(head), "--json", *map(str, paths))
    return {
        json.loads(line)["path"].rsplit("/", 1)[-1]: json.loads(line)["p_fake"] for line in result.stdout.splitlines()
    }


def test_eval_scan_and_a_worker_agree_under_a_reencoding_head(trained, postgres_url, tiny_store, tmp_path):
    root, lab_env, summary = trained
    head_path = root / "head.safetensors"
    assert summary["input_transform"] == TRANSFORM == Head.load(head_path).metadata.input_transform
    images = sorted((root / "test").rglob("*.png"))
    evaluated = _eval_scores(lab_env, root, head_path)
    scanned = _scan_scores(lab_env, images, head_path)
    # a real worker, its checks filed by path
    for image in images:
        shutil.copy(image, tmp_path / image.name)
    for stack in make_stack(postgres_url, tiny_store, tmp_path, ITEM_HEAD=str(head_path)):
        worker = Worker(stack, "worker")
        try:
            submitted = stack.submit(*(str(tmp_path / image.name) for image in images))
            rows = stack.wait_terminal([one["check_id"] for one in submitted])
        finally:
            worker.stop()
        served = {row.external_id.rsplit("/", 1)[-1]: row.p_fake for row in rows.values()}
    assert set(evaluated) == set(scanned) == set(served) == {image.name for image in images}
    for name in evaluated:
        assert abs(evaluated[name] - scanned[name]) < 1e-5 and abs(scanned[name] - served[name]) < 1e-5, name


def test_without_its_transform_the_same_head_scores_otherwise(trained, tmp_path):
    root, lab_env, _ = trained
    stripped = Head.load(root / "head.safetensors")
    stripped.metadata.input_transform = "none"
    stripped_path = stripped.save(tmp_path / "stripped")
    assert stripped.version != Head.load(root / "head.safetensors").version  # another detector: another version
    images = sorted((root / "test").rglob("*.png"))
    with_transform = _scan_scores(lab_env, images, root / "head.safetensors")
    without = _scan_scores(lab_env, images, stripped_path)
    assert any(abs(with_transform[name] - without[name]) > 1e-4 for name in with_transform)
