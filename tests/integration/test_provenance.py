"""Provenance through the service: what each upload's bytes declare is stored with its result, can decide its
verdict, survives a head upgrade without reading the image again, and is read again when the trust list changes.
In-process on both databases, then through a real `item worker` on Redis and Postgres."""

from __future__ import annotations

import pytest

from pipeline.core.detector import Detector
from pipeline.core.profiles import get_profile
from tests import provenance_files as files
from tests.conftest import count_stage_images, random_head
from tests.integration.stack import Worker, make_stack
from worker.gpu.batches import CheckService
from worker.gpu.embedded import InProcess
from worker.settings import Settings


@pytest.fixture(scope="module")
def creds():
    return files.credentials()


@pytest.fixture
def uploads(creds, tmp_path):
    """name → path of each kind of upload: trusted and untrusted manifests, XMP, a damaged manifest, nothing."""
    made = {
        "trusted": files.signed(files.jpeg((200, 30, 30)), creds),
        "untrusted": files.signed(files.jpeg((30, 30, 200)), files.credentials("Stranger")),
        "xmp": files.jpeg_with_xmp(files.xmp_packet(), files.jpeg((30, 200, 30))),
        "damaged": files.truncated_manifest(files.signed(files.jpeg((200, 200, 30)), creds)),
        "plain": files.jpeg((90, 90, 90)),
    }
    (tmp_path / "anchors.pem").write_text(creds.ca_pem)
    paths = {}
    for name, data in made.items():
        paths[name] = tmp_path / f"{name}.jpg"
        paths[name].write_bytes(data)
    return paths


def _service(ledger, tiny_store, folder, seed: int = 0, **settings) -> CheckService:
    detector = Detector(get_profile("tiny"), tiny_store, device="cpu", provenance_policy=settings.get("decides", "off"))
    detector.use_head(random_head(detector, seed=seed))
    config = Settings(
        batch_max_wait_s=0, allowed_path_roots=[folder], database_url="sqlite://",
        c2pa_trust_anchors=settings.get("anchors"), provenance_decides=settings.get("decides", "off"),
    )  # fmt: skip
    return CheckService(config, ledger, detector)


def _run(service: CheckService, paths: dict, prefix: str = "") -> dict:
    runner = InProcess(service.settings, service)
    filed = runner.submit([_request(f"{prefix}{name}", path) for name, path in paths.items()])
    with service.ledger.session() as session:
        rows = service.ledger.checks_by_id(session, [one.check.id for one in filed])
    return {row.external_id.removeprefix(prefix): row for row in rows}


def _rescore(service: CheckService, earlier: list) -> dict:
    """`item rescore`'s checks of `earlier` under `service`'s version, run to their end here."""
    runner = InProcess(service.settings, service)
    with service.ledger.session() as session:
        made, _ = service.ledger.create_rescores(session, earlier, service.version_id)
    runner.finish([row.id for row in made.values()])
    with service.ledger.session() as session:
        rows = service.ledger.checks_by_id(session, [row.id for row in made.values()])
    return {row.external_id: row for row in rows}


def _request(external_id, path):
    from worker.intake.filing import CheckRequest

    return CheckRequest(external_id, {"path": str(path)})


def test_provenance_is_stored_decides_when_trusted_and_survives_a_head_upgrade(ledger, tiny_store, uploads, tmp_path):
    anchors = tmp_path / "anchors.pem"
    rows = _run(_service(ledger, tiny_store, tmp_path, anchors=anchors, decides="trusted"), uploads)
    assert {row.status for row in rows.values()} == {"done"}  # a damaged manifest costs no check anything
    states = {name: (row.provenance["c2pa"].get("validation_state"), row.verdict_reason) for name, row in rows.items()}
    assert states == {
        "trusted": ("valid", "provenance.c2pa"),
        "untrusted": ("untrusted", "score"),
        "xmp": (None, "score"),
        "damaged": ("invalid", "score"),
        "plain": (None, "score"),
    }
    assert rows["trusted"].verdict == "fake" and rows["xmp"].provenance["declared_by"] == ["xmp"]
    assert [error["code"] for error in rows["damaged"].provenance["errors"]] == ["provenance.c2pa_invalid"]
    # when the head is upgraded and the checks re-scored, with the images gone from disk: only the head runs,
    # from stored features and provenance, and every answer keeps what its bytes declared
    for path in uploads.values():
        path.unlink()
    upgraded = _service(ledger, tiny_store, tmp_path, seed=1, anchors=anchors, decides="trusted")
    again = _rescore(upgraded, list(rows.values()))
    assert {row.status for row in again.values()} == {"done"}
    assert {name: row.provenance for name, row in again.items()} == {name: row.provenance for name, row in rows.items()}
    assert (
        again["trusted"].verdict == "fake"
        and again["trusted"].pipeline_version_id != rows["trusted"].pipeline_version_id
    )


def test_a_new_trust_list_reads_the_bytes_again_but_reuses_every_stage(ledger, tiny_store, uploads, tmp_path):
    trusting = _service(ledger, tiny_store, tmp_path, anchors=tmp_path / "anchors.pem")
    first = _run(trusting, {"trusted": uploads["trusted"]}, prefix="t-")
    assert first["trusted"].provenance["c2pa"]["validation_state"] == "valid"
    distrusting = _service(ledger, tiny_store, tmp_path, seed=2)  # no trust anchors at all now
    stages = count_stage_images(distrusting.detector)
    rows = _rescore(distrusting, list(first.values()))
    assert rows["t-trusted"].status == "done" and sum(stages.values()) == 0  # the stages' artifacts were reused
    assert rows["t-trusted"].provenance["c2pa"]["validation_state"] == "untrusted"


def test_an_image_gone_since_its_check_is_rescored_from_its_features_without_provenance(
    ledger, tiny_store, uploads, tmp_path
):
    # given checks stored without provenance (as before it was read), whose images are gone since
    unread = _service(ledger, tiny_store, tmp_path)
    unread = CheckService(unread.settings.model_copy(update={"read_provenance": False}), ledger, unread.detector)
    first = _run(unread, {"trusted": uploads["trusted"]}, prefix="g-")
    uploads["trusted"].unlink()
    # when they are re-scored by a service that reads provenance, then they are scored from their features, not
    # failed for an image only their provenance needed
    rows = _rescore(_service(ledger, tiny_store, tmp_path, seed=3), list(first.values()))
    assert rows["g-trusted"].status == "done" and rows["g-trusted"].provenance is None


def test_provenance_can_be_turned_off(ledger, tiny_store, uploads, tmp_path):
    service = _service(ledger, tiny_store, tmp_path)
    service = CheckService(service.settings.model_copy(update={"read_provenance": False}), ledger, service.detector)
    rows = _run(service, {"trusted": uploads["trusted"]}, prefix="off-")
    assert rows["trusted"].status == "done" and rows["trusted"].provenance is None


@pytest.mark.slow
def test_a_real_worker_reports_provenance_and_lets_a_trusted_declaration_decide(
    postgres_url, tiny_store, uploads, tmp_path
):
    env = {"ITEM_C2PA_TRUST_ANCHORS": str(tmp_path / "anchors.pem"), "ITEM_PROVENANCE_DECIDES": "trusted"}
    for stack in make_stack(postgres_url, tiny_store, tmp_path, **env):
        worker = Worker(stack, "worker")
        try:
            submitted = stack.submit(*(str(path) for path in uploads.values()))
            rows = stack.wait_terminal([one["check_id"] for one in submitted])
        finally:
            worker.stop()
    by_name = {row.external_id.rsplit("/", 1)[-1].removesuffix(".jpg"): row for row in rows.values()}
    assert {row.status for row in by_name.values()} == {"done"}
    assert by_name["trusted"].verdict == "fake" and by_name["trusted"].verdict_reason == "provenance.c2pa"
    assert by_name["untrusted"].provenance["c2pa"]["validation_state"] == "untrusted"
    assert by_name["damaged"].provenance["errors"][0]["code"] == "provenance.c2pa_invalid"
    assert by_name["xmp"].provenance["xmp"]["ai_generated"] is True


def test_a_head_upgrade_to_attribution_is_rescored_by_the_head_alone(ledger, tiny_store, uploads, tmp_path):
    binary = _service(ledger, tiny_store, tmp_path)
    first = _run(binary, {"plain": uploads["plain"], "xmp": uploads["xmp"]}, prefix="a-")
    assert all(row.attribution is None for row in first.values())
    # given an attribution head over two generators, re-scoring the earlier checks with the images gone
    for path in uploads.values():
        path.unlink()
    attributing = _service(ledger, tiny_store, tmp_path)
    attributing.detector.use_head(random_head(attributing.detector, seed=5, groups=["real", "gen-a", "gen-b"]))
    stages = count_stage_images(attributing.detector)
    rows = _rescore(attributing, list(first.values()))
    # then only the head ran, under a new version, and each result names both generators, likeliest first, whose
    # shares make up its P(fake)
    assert sum(stages.values()) == 0 and {row.status for row in rows.values()} == {"done"}
    for row in rows.values():
        assert row.pipeline_version_id == attributing.version_id != binary.version_id
        assert [one["generator"] for one in row.attribution] in (["gen-a", "gen-b"], ["gen-b", "gen-a"])
        assert row.attribution[0]["p"] >= row.attribution[1]["p"]
        assert abs(sum(one["p"] for one in row.attribution) - row.p_fake) < 1e-5
    assert rows["a-xmp"].provenance == first["xmp"].provenance
