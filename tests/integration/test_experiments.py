"""`item features | train | eval | calibrate` as a user runs them: real processes, files on disk, tiny models.

The data are two visibly different synthetic families (smooth = real, patterned = fake) in the benchmark
layout, so a head trained through the whole pipeline has an honest signal to find on held-out images.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, average_precision_score

from pipeline.core.head import Head
from pipeline.core.profiles import get_profile
from pipeline.lab.synthetic import write_benchmark
from tests.integration.stack import run_item
from tests.integration.test_cli import env as env  # noqa: F401  (the module fixture: tiny models, offline)

pytestmark = pytest.mark.slow
TRAIN_GROUPS = ("gen-a", "gen-b")
TEST_GROUPS = ("gen-a", "gen-b", "gen-c")


@pytest.fixture(scope="module")
def lab(env, tmp_path_factory):  # noqa: F811
    """Train and test sets, a shared feature cache, and one trained head."""
    root = tmp_path_factory.mktemp("lab")
    write_benchmark(root / "train", TRAIN_GROUPS, per_class=10, seed=0)
    write_benchmark(root / "test", TEST_GROUPS, per_class=6, seed=1)
    (root / "train" / "gen-a" / "0_real" / "README.txt").write_text("not an image")
    lab_env = {**env, "ITEM_FEATURE_DIR": str(root / "cache"), "ITEM_PROFILE": "tiny"}
    train = _train(lab_env, root / "train", root / "head")
    return root, lab_env, train


def _train(env, data, out, *extra: str) -> dict:
    result = run_item(env, "train", str(data), "--out", str(out), "--hidden", "32", "--json", *extra)
    return json.loads(result.stdout)


def test_training_is_deterministic_for_a_seed(lab):
    root, env, first = lab
    again = _train(env, root / "train", root / "head-again")
    assert (root / "head.safetensors").read_bytes() == (root / "head-again.safetensors").read_bytes()
    assert again["version"] == first["version"]
    other = _train(env, root / "train", root / "head-seed1", "--seed", "1")
    assert other["version"] != first["version"]


def test_training_records_the_paper_recipe_and_what_it_saw(lab):
    root, _, summary = lab
    assert (summary["epochs"], summary["lr"], summary["weight_decay"]) == (50, 1e-3, 1e-3)
    assert summary["features"]["images"] == 40 and summary["features"]["unreadable"] == 1
    assert summary["features"]["unreadable_by_code"] == {"image.unsupported_format": 1}
    assert summary["n_train"] + round(40 * 0.1) == 40  # 10% held out per generator and class
    assert summary["validation"]["accuracy"] >= 0.75
    metadata = json.loads((root / "head.json").read_text())
    assert metadata["profile"] == "tiny" and metadata["input_transform"] == "none"
    assert set(metadata["rules"]) == {"phrases", "features"}  # the code rules the features depend on


def test_second_extraction_reuses_every_cached_feature(lab):
    root, env, _ = lab
    summary = json.loads(run_item(env, "features", str(root / "train"), "--json").stdout)
    assert (summary["computed"], summary["reused"], summary["unreadable"]) == (0, 40, 1)
    assert summary["groups"] == {"gen-a": {"real": 10, "fake": 10}, "gen-b": {"real": 10, "fake": 10}}


def test_eval_on_held_out_images_matches_scikit_learn_and_has_every_group(lab):
    root, env, _ = lab
    out = root / "eval"
    summary = json.loads(
        run_item(
            env, "eval", str(root / "test"), "--head", str(root / "head.safetensors"), "--out", str(out), "--json"
        ).stdout
    )
    rows = {row["group"]: row for row in csv.DictReader((out / "metrics.csv").open())}
    assert list(rows) == [*TEST_GROUPS, "mean", "all"]
    assert all((int(rows[g]["n_real"]), int(rows[g]["n_fake"])) == (6, 6) for g in TEST_GROUPS)
    scores = list(csv.DictReader((out / "scores.csv").open()))
    assert len(scores) == 36
    for group in [*TEST_GROUPS, "all"]:
        chosen = [row for row in scores if group in (row["group"], "all")]
        labels = np.array([int(row["label"]) for row in chosen])
        p_fake = np.array([float(row["p_fake"]) for row in chosen])
        ap = average_precision_score(labels, p_fake)
        acc = accuracy_score(labels, (p_fake >= summary["threshold"]).astype(int))
        assert float(rows[group]["average_precision"]) == pytest.approx(ap, abs=1e-5)
        assert float(rows[group]["accuracy"]) == pytest.approx(acc)
    assert float(rows["all"]["accuracy"]) >= 0.9  # an honest signal through the whole pipeline
    for name in ("pr.png", "roc.png", "tsne.png"):
        assert Image.open(out / name).size[0] > 100
    assert "| Method |" in (out / "metrics.md").read_text()


def test_eval_perturbations_score_each_level(lab):
    root, env, _ = lab
    out = root / "robust"
    args = ("eval", str(root / "test"), "--head", str(root / "head.safetensors"), "--out", str(out))
    run_item(env, *args, "--perturb", "--perturbations", "jpeg,blur", "--no-plots")
    rows = list(csv.DictReader((out / "robustness.csv").open()))
    assert [(row["kind"], row["level"]) for row in rows] == [
        ("clean", ""),
        ("jpeg", "75"),
        ("jpeg", "50"),
        ("jpeg", "25"),
        ("blur", "1"),
        ("blur", "2"),
        ("blur", "3"),
    ]
    assert all(int(row["n"]) == 36 for row in rows)
    assert not (out / "robustness.png").exists()


def test_calibration_meets_the_target_on_its_real_images(lab):
    root, env, _ = lab
    calibrated = root / "calibrated.safetensors"
    args = ("calibrate", str(root / "test"), "--head", str(root / "head.safetensors"), "--out", str(calibrated))
    report = json.loads(run_item(env, *args, "--target-fpr", "0.1", "--json").stdout)
    assert report["n_real"] == 18 and report["fpr"] <= 0.1 and report["false_positives"] <= 1
    head = Head.load(calibrated)
    assert head.metadata.threshold == report["threshold"] and head.version == report["version"]
    eval_scores = root / "eval" / "scores.csv"  # the same real images, as `item eval` scored them
    if eval_scores.exists():
        reals = [float(row["p_fake"]) for row in csv.DictReader(eval_scores.open()) if row["label"] == "0"]
        assert np.mean(np.array(reals) >= report["threshold"]) <= 0.1


def test_ablations_are_options_recorded_in_the_stage_versions(lab):
    root, env, first = lab
    summary = _train(env, root / "train", root / "head-ablation", "--no-grounding", "--representation", "global")
    metadata = json.loads((root / "head-ablation.json").read_text())
    assert metadata["profile"] == get_profile("tiny+ground=off").name
    assert metadata["stage_versions"]["ground"].startswith("ground:item/whole-image")
    assert (metadata["w1"], metadata["w2"]) == (1.0, 0.0)
    assert (
        metadata["stage_versions"]["caption"]
        == json.loads((root / "head.json").read_text())["stage_versions"]["caption"]
    )
    assert summary["features"]["computed"] == 40  # new boxes, so new features; captions came from the cache
    result = run_item(
        env,
        "eval",
        str(root / "test"),
        "--head",
        str(root / "head-ablation.safetensors"),
        "--out",
        str(root / "eval-ablation"),
        "--no-plots",
        "--json",
    )
    assert json.loads(result.stdout)["metrics"][-1]["n"] == 36


def test_reencoding_guards_against_format_bias(lab):
    root, lab_env, _ = lab
    write_benchmark(root / "biased", ("gen-a",), per_class=6, seed=2)
    for path in (root / "biased" / "gen-a" / "0_real").iterdir():  # reals as JPEG, fakes stay PNG
        Image.open(path).save(path.with_suffix(".jpg"), quality=90)
        path.unlink()
    args = ("eval", str(root / "biased"), "--head", str(root / "head.safetensors"), "--no-plots", "--json")
    biased = json.loads(run_item(lab_env, *args, "--out", str(root / "eval-biased")).stdout)
    assert "100% JPEG" in biased["format_warning"]
    guarded = json.loads(run_item(lab_env, *args, "--out", str(root / "eval-guarded"), "--reencode", "jpeg:95").stdout)
    assert guarded["format_warning"] is None and guarded["input_transform"] == "jpeg:95"


def test_features_can_be_cached_in_the_ledger(lab, tmp_path):
    root, env, _ = lab
    ledger_env = {**env, "ITEM_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.sqlite3'}"}
    run_item(ledger_env, "db", "upgrade")
    args = ("features", str(root / "test"), "--cache-in-ledger", "--json")
    first = json.loads(run_item(ledger_env, *args).stdout)
    second = json.loads(run_item(ledger_env, *args).stdout)
    assert first["computed"] == 36 and (second["computed"], second["reused"]) == (0, 36)


def test_bad_input_gets_a_clear_error(lab, tmp_path):
    root, env, _ = lab
    (tmp_path / "flat").mkdir()
    result = run_item(env, "train", str(tmp_path / "flat"), "--out", str(tmp_path / "h"), check_exit=2)
    assert "dataset.unrecognised" in result.stderr and "0_real" in result.stderr
    write_benchmark(tmp_path / "real-only", ("g",), per_class=3)
    for path in (tmp_path / "real-only" / "g" / "1_fake").iterdir():
        path.unlink()
    result = run_item(env, "train", str(tmp_path / "real-only"), "--out", str(tmp_path / "h"), check_exit=2)
    assert "no readable fake images" in result.stderr


def test_calibration_with_fakes_sets_an_uncertain_band_that_eval_reports(lab):
    root, env, _ = lab
    banded = root / "banded.safetensors"
    args = ("calibrate", str(root / "test"), "--head", str(root / "head.safetensors"), "--out", str(banded))
    # known fakes that look like the reals (a generator the head never saw makes real-looking images): no one
    # threshold can meet both targets, so the band opens
    lookalikes = root / "lookalikes"
    lookalikes.mkdir(exist_ok=True)
    for path in sorted((root / "test").glob("*/0_real/*.png"))[:10]:
        (lookalikes / f"{path.parent.parent.name}-{path.name}").write_bytes(path.read_bytes())
    hard = ("--target-fpr", "0.0", "--fakes", str(lookalikes), "--target-catch", "0.9")
    report = json.loads(run_item(env, *args, *hard, "--json").stdout)
    assert report["n_fake"] == 10 and report["target_catch"] == 0.9
    head = Head.load(banded)
    assert head.metadata.threshold_low == report["threshold_low"]
    assert report["threshold_low"] < report["threshold"] and report["fakes_caught"] >= 0.9
    assert report["real_in_band"] > 0  # the lookalikes' own originals are in the band too
    out = root / "eval-banded"
    run_item(env, "eval", str(root / "test"), "--head", str(banded), "--out", str(out), "--no-plots", "--json")
    rows = list(csv.DictReader((out / "scores.csv").open()))
    edges = (head.metadata.threshold, report["threshold_low"])
    for row in rows:  # every verdict follows the two thresholds (scores.csv rounds to 6 decimals: edges aside)
        p = float(row["p_fake"])
        if min(abs(p - edge) for edge in edges) < 1e-6:
            continue
        expected = "fake" if p >= head.metadata.threshold else "uncertain" if p >= report["threshold_low"] else "real"
        assert row["verdict"] == expected
    assert {row["verdict"] for row in rows} >= {"uncertain"}


def test_an_attribution_head_names_generators_and_eval_writes_its_confusion(lab):
    root, env, _ = lab
    groups = ["real", *TRAIN_GROUPS]
    summary = _train(env, root / "train", root / "head-attr", "--attribute")
    assert summary["groups"] == groups and json.loads((root / "head-attr.json").read_text())["groups"] == groups
    assert list(summary["classes"]) == groups and sum(summary["classes"].values()) == summary["n_train"]
    assert summary["classes"]["real"] == summary["n_train"] - summary["n_fake"]
    assert 0 <= summary["validation"]["attribution_accuracy"] <= 1
    out = root / "eval-attr"
    args = ("eval", str(root / "test"), "--head", str(root / "head-attr.safetensors"), "--out", str(out))
    report = json.loads(run_item(env, *args, "--json").stdout)
    with (out / "confusion.csv").open() as file:
        assert next(csv.reader(file)) == ["true", *groups, "total", "recall"]
    rows = list(csv.DictReader((out / "confusion.csv").open()))
    counts = [[int(row[group]) for group in groups] for row in rows]
    assert sum(map(sum, counts)) == report["metrics"][-1]["n"] == len(list(csv.DictReader((out / "scores.csv").open())))
    assert {row["true"]: int(row["total"]) for row in rows} == {"real": 18, "gen-a": 6, "gen-b": 6, "other": 6}
    attribution = report["attribution"]
    assert (attribution["matrix"], attribution["labels"], attribution["groups"]) == (counts, [*groups, "other"], groups)
    assert json.loads((out / "summary.json").read_text())["attribution"] == attribution
    markdown = (out / "confusion.md").read_text().splitlines()
    assert len(markdown) == 2 + len(rows) and markdown[-1].startswith(f"| other | {' | '.join(map(str, counts[-1]))} |")
    with Image.open(out / "confusion.png") as image:
        assert image.size[0] > 100
    assert set(report["files"]) >= {"confusion_csv", "confusion_md", "confusion_png"}


def test_an_attribution_head_on_the_console_and_calibrated(lab):
    root, env, _ = lab
    trained = run_item(
        env, "train", str(root / "train"), "--out", str(root / "head-attr-1"), "--attribute", "--epochs", "1"
    )
    assert "real (18), gen-a (9), gen-b (9)" in trained.stdout and "validation attribution" in trained.stdout
    out = root / "eval-attr-console"
    args = ("eval", str(root / "test"), "--head", str(root / "head-attr-1.safetensors"), "--out", str(out))
    shown = run_item(env, *args, "--no-plots").stdout
    assert "attribution · ACC %" in shown and "other" in shown and "recall %" in shown
    assert (out / "confusion.csv").is_file() and not (out / "confusion.png").exists()
    calibrated = root / "head-attr-calibrated.safetensors"
    args = ("calibrate", str(root / "test"), "--head", str(root / "head-attr-1.safetensors"), "--out", str(calibrated))
    report = json.loads(run_item(env, *args, "--target-fpr", "0.1", "--json").stdout)
    head = Head.load(calibrated)
    assert report["fpr"] <= 0.1 and head.metadata.groups == ["real", *TRAIN_GROUPS]
    assert head.metadata.threshold == report["threshold"]


def test_attribution_needs_two_generators(lab, tmp_path):
    root, env, _ = lab
    write_benchmark(tmp_path / "one", ("gen-a",), per_class=3)
    args = ("train", str(tmp_path / "one"), "--out", str(tmp_path / "h"), "--attribute")
    result = run_item(env, *args, check_exit=2)
    assert "at least 2 generator folders" in result.stderr and "only 'gen-a'" in result.stderr
    assert not (tmp_path / "h.safetensors").exists()
    run_item(env, *args[:-1], "--epochs", "1", "--json")  # the same data make a real-against-fake head
