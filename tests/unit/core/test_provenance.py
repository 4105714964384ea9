"""Provenance read from the original bytes: XMP packets and C2PA manifests the tests write and sign themselves,
intact, untrusted, tampered with, truncated, oversized and of the wrong shape."""

from __future__ import annotations

import pytest

from pipeline.core import provenance as prov
from pipeline.core.imaging import decode_image
from pipeline.core.provenance import Provenance, ProvenanceReader, deciding_reason
from pipeline.core.scan import scan
from tests import provenance_files as files
from tests.conftest import random_head


@pytest.fixture(scope="module")
def creds():
    return files.credentials()


@pytest.fixture(scope="module")
def trusting(creds):
    return ProvenanceReader(creds.ca_pem)


def codes(provenance: Provenance) -> list[str]:
    return [error.code for error in provenance.errors]


def test_an_image_without_metadata_declares_nothing():
    found = ProvenanceReader().read(files.jpeg(), "JPEG")
    assert found.c2pa is None and found.xmp is None and not found.errors
    assert found.to_dict()["declares_ai"] is False and found.to_dict()["c2pa"] == {"present": False}


@pytest.mark.parametrize("as_element", [False, True])
def test_xmp_in_a_jpeg_declares_its_digital_source_type(as_element):
    data = files.jpeg_with_xmp(files.xmp_packet(files.AI_TYPE, as_element=as_element))
    decode_image(data)  # still an image every decoder opens
    found = ProvenanceReader().read(data, "JPEG")
    assert found.xmp.digital_source_type == files.AI_TYPE and found.declared_by == ["xmp"] and not found.errors


@pytest.mark.parametrize("compressed", [False, True])
def test_xmp_in_a_png_itxt_chunk_is_read_deflated_or_not(compressed):
    data = files.png_with_xmp(files.xmp_packet(files.CAMERA_TYPE), compressed=compressed)
    decode_image(data)
    found = ProvenanceReader().read(data, "PNG")
    assert found.xmp.digital_source_type == files.CAMERA_TYPE
    assert not found.xmp.ai_generated and found.declared_by == [] and not found.errors


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_every_format_that_keeps_metadata_gives_its_xmp_and_its_manifest(creds, trusting, image_format):
    data = files.with_xmp(image_format, files.xmp_packet())
    assert decode_image(data).format == image_format
    assert trusting.read(data, image_format).declared_by == ["xmp"]
    signed = files.signed(data, creds, f"image/{image_format.lower()}")
    assert decode_image(signed).format == image_format
    found = trusting.read(signed, image_format)
    assert found.c2pa.validation_state == "valid" and "c2pa" in found.declared_by and not found.errors


def test_a_manifest_signed_by_a_configured_anchor_is_valid_and_by_anyone_else_untrusted(creds, trusting):
    data = files.signed(files.jpeg(), creds)
    decode_image(data)
    trusted, untrusted = trusting.read(data, "JPEG"), ProvenanceReader().read(data, "JPEG")
    assert trusted.c2pa.validation_state == "valid" and trusted.c2pa.failures == []
    assert untrusted.c2pa.validation_state == "untrusted" and "signingCredential.untrusted" in untrusted.c2pa.failures
    for found in (trusted, untrusted):
        assert found.c2pa.claim_generator == "ITEM test generator 1.0"
        assert found.c2pa.signer == "Test Generator (ITEM tests)"
        assert found.c2pa.actions == [{"action": "c2pa.created", "digital_source_type": "trainedAlgorithmicMedia"}]
        assert found.declared_by == ["c2pa"] and not found.errors
    # another CA's anchors do not make it trusted
    assert ProvenanceReader(files.credentials("Other").ca_pem).read(data, "JPEG").c2pa.validation_state == "untrusted"
    # and the trust anchors are part of the version stored provenance is kept under
    assert len({trusting.version, ProvenanceReader().version}) == 2


def test_a_manifest_in_a_png_and_one_without_an_ai_action(creds, trusting):
    found = trusting.read(files.signed(files.png(), creds, "image/png"), "PNG")
    assert found.c2pa.validation_state == "valid" and found.c2pa.ai_generated
    camera = trusting.read(files.signed(files.jpeg(), creds, source_type=files.CAMERA_TYPE), "JPEG")
    assert camera.c2pa.validation_state == "valid" and not camera.c2pa.ai_generated and camera.declared_by == []


def test_pixels_changed_after_signing_make_the_manifest_invalid(creds, trusting):
    data = bytearray(files.signed(files.jpeg(), creds))
    data[-20] ^= 0xFF  # in the entropy-coded scan, which the manifest's data hash covers
    found = trusting.read(bytes(data), "JPEG")
    assert found.c2pa.validation_state == "invalid" and "assertion.dataHash.mismatch" in found.c2pa.failures
    assert codes(found) == ["provenance.c2pa_invalid"] and "dataHash.mismatch" in found.errors[0].message
    assert found.declared_by == []  # an invalid manifest declares nothing


@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_a_damaged_manifest_is_a_readable_error_and_the_image_still_decodes(creds, trusting, damage):
    data = files.signed(files.jpeg(), creds)
    if damage == "truncated":
        data = files.truncated_manifest(data)
    else:
        start = data.find(b"c2pa.actions")
        data = data[: start + 100] + b"\x00" * 60 + data[start + 160 :]
    found = trusting.read(data, "JPEG")
    assert codes(found) == ["provenance.c2pa_invalid"] and found.c2pa.validation_state == "invalid"
    assert found.c2pa_present and found.errors[0].message and found.declared_by == []
    decode_image(data)


def test_a_manifest_store_over_its_limit_is_not_parsed(creds, trusting, monkeypatch):
    data = files.signed(files.jpeg(), creds)
    monkeypatch.setattr(prov, "MAX_MANIFEST_BYTES", 1024)  # the store is ~25 KiB: over a 1 KiB limit
    found = trusting.read(data, "JPEG")
    assert codes(found) == ["provenance.c2pa_too_large"] and found.c2pa is None and found.c2pa_present


def test_a_parse_past_its_time_limit_is_an_error_not_a_wait(creds):
    found = ProvenanceReader(timeout_s=1e-6).read(files.signed(files.jpeg(), creds), "JPEG")
    assert codes(found) == ["provenance.timeout"] and found.c2pa is None


@pytest.mark.parametrize(
    "packet, code",
    [
        (files.xmp_packet()[:-60], "provenance.xmp_invalid"),  # truncated: not well-formed
        (
            files.xmp_packet(
                body='<rdf:Description rdf:about=""><Iptc4xmpExt:DigitalSourceType><rdf:Bag><rdf:li>a</rdf:li>'
                "</rdf:Bag></Iptc4xmpExt:DigitalSourceType></rdf:Description>"
            ),
            "provenance.xmp_invalid",
        ),  # a list where one URI belongs
        (
            files.xmp_packet(
                body=f'<rdf:Description rdf:about="" Iptc4xmpExt:DigitalSourceType="{files.AI_TYPE}"/>'
                f'<rdf:Description rdf:about="" Iptc4xmpExt:DigitalSourceType="{files.CAMERA_TYPE}"/>'
            ),
            "provenance.xmp_invalid",
        ),  # two values that disagree
        (
            files.xmp_packet(body='<rdf:Description rdf:about="" Iptc4xmpExt:DigitalSourceType="not a uri"/>'),
            "provenance.xmp_invalid",
        ),
        (
            b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
            b'<x:xmpmeta xmlns:x="adobe:ns:meta/">&b;</x:xmpmeta>',
            "provenance.xmp_invalid",
        ),  # entities and DTDs are refused, not expanded
    ],
    ids=["truncated", "wrong-type", "ambiguous", "not-a-uri", "entities"],
)
def test_a_damaged_xmp_packet_is_a_readable_error_and_the_image_still_decodes(packet, code):
    data = files.jpeg_with_xmp(packet)
    found = ProvenanceReader().read(data, "JPEG")
    assert codes(found) == [code] and found.declared_by == []
    decode_image(data)


def test_an_oversized_xmp_packet_is_refused_before_parsing():
    packet = files.xmp_packet(body='<rdf:Description rdf:about=""/>' + " " * (prov.MAX_XMP_BYTES + 10))
    for compressed in (False, True):  # deflated: inflating stops at the limit, whatever the ratio
        found = ProvenanceReader().read(files.png_with_xmp(packet, compressed=compressed), "PNG")
        assert codes(found) == ["provenance.xmp_too_large"] and found.xmp is None


def test_provenance_round_trips_through_its_stored_form(creds, trusting):
    data = files.jpeg_with_xmp(files.xmp_packet(), files.signed(files.jpeg(), creds))
    found = trusting.read(files.signed(files.jpeg_with_xmp(files.xmp_packet()), creds), "JPEG")
    assert found.declared_by == ["c2pa", "xmp"]
    assert Provenance.from_dict(found.to_dict()) == found
    assert Provenance.from_dict(trusting.read(data, "JPEG").to_dict()) == trusting.read(data, "JPEG")


@pytest.mark.parametrize(
    "state, xmp_ai, policy, reason",
    [
        ("valid", False, "off", None),
        ("valid", False, "trusted", "provenance.c2pa"),
        ("untrusted", False, "trusted", None),
        ("untrusted", False, "declared", "provenance.c2pa"),
        ("invalid", False, "declared", None),
        (None, True, "trusted", None),
        (None, True, "declared", "provenance.xmp"),
        ("invalid", True, "declared", "provenance.xmp"),
    ],
)
def test_which_declarations_decide_the_verdict(state, xmp_ai, policy, reason):
    action = [{"action": "c2pa.created", "digital_source_type": "trainedAlgorithmicMedia"}]
    found = Provenance(
        c2pa=prov.C2paFinding(state, actions=action) if state else None,
        xmp=prov.XmpFinding(files.AI_TYPE if xmp_ai else None),
    )
    assert deciding_reason(found, policy) == reason


def test_a_scan_reports_provenance_and_a_trusted_declaration_can_decide(tiny_detector, creds, trusting, tmp_path):
    signed_path, plain_path, broken_path = tmp_path / "signed.jpg", tmp_path / "plain.jpg", tmp_path / "broken.jpg"
    signed_path.write_bytes(files.signed(files.jpeg(), creds))
    plain_path.write_bytes(files.jpeg())
    broken_path.write_bytes(files.jpeg_with_xmp(files.xmp_packet()[:-60]))
    tiny_detector.use_head(random_head(tiny_detector))
    try:
        rows = {row.path.name: row for row in scan([signed_path, plain_path, broken_path], tiny_detector)}
        assert all(row.detection.provenance is None for row in rows.values())  # not asked for: not read
        tiny_detector.provenance_policy = "trusted"
        paths = [signed_path, plain_path, broken_path]
        rows = {row.path.name: row.to_dict() for row in scan(paths, tiny_detector, provenance=trusting)}
    finally:
        tiny_detector.provenance_policy = "off"
    signed, plain, broken = rows["signed.jpg"], rows["plain.jpg"], rows["broken.jpg"]
    assert signed["verdict"] == "fake" and signed["verdict_reason"] == "provenance.c2pa"
    assert signed["provenance"]["c2pa"]["validation_state"] == "valid" and 0 <= signed["p_fake"] <= 1
    assert plain["verdict_reason"] == "score" and plain["provenance"]["declares_ai"] is False
    assert broken["error"] is None and broken["provenance"]["errors"][0]["code"] == "provenance.xmp_invalid"
    assert broken["verdict_reason"] == "score"


def test_a_reader_made_before_a_fork_still_reads_in_the_child(creds, trusting):
    import os

    data = files.signed(files.jpeg(), creds)
    assert trusting.read(data, "JPEG").c2pa.validation_state == "valid"  # its context and threads made here
    readable, writable = os.pipe()
    child = os.fork()
    if child == 0:  # the child: a worker's pool process, as a fork makes it
        try:
            found = trusting.read(data, "JPEG")
            os.write(writable, (found.c2pa.validation_state if found.c2pa else repr(found.errors)).encode())
        finally:
            os._exit(0)
    os.close(writable)
    os.waitpid(child, 0)
    with os.fdopen(readable, "rb") as answer:
        assert answer.read().decode() == "valid"


@pytest.mark.parametrize("base", ["jpeg", "png"])
def test_random_damage_anywhere_never_raises(creds, trusting, base):
    import random

    # given signed files with XMP, damaged at random places: bytes flipped, cut short, segments repeated
    mime, image_format = ("image/jpeg", "JPEG") if base == "jpeg" else ("image/png", "PNG")
    original = files.signed(getattr(files, base)(), creds, mime)
    with_xmp = files.jpeg_with_xmp if base == "jpeg" else files.png_with_xmp
    original = with_xmp(files.xmp_packet(), original)
    rng = random.Random(f"damage-{base}")
    for _ in range(150):
        data = bytearray(original)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(data))
            data[at] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(8, len(data))]
        # when read, then the answer is a Provenance, whose errors, if any, have stable codes
        found = trusting.read(bytes(data), image_format)
        assert all(error.code.startswith("provenance.") and error.message for error in found.errors)
        assert Provenance.from_dict(found.to_dict()) == found
