"""What an image declares about its own origin, read from the original bytes: a C2PA manifest and the IPTC
`DigitalSourceType` of its XMP packet.

Provenance is evidence beside the score, never a reason to fail a check: whatever the bytes hold (no metadata, a
truncated manifest, an XMP packet of the wrong shape, a parse that runs too long), reading them gives a
`Provenance`, with what could not be read as typed errors in it. Reading is bounded: the metadata is located by
walking the container's segments (JPEG markers, PNG chunks, RIFF chunks) without decoding pixels, a packet or
manifest store over its size limit is refused before any parser sees it, the XMP parser allows no entities or
DTDs, and the C2PA parse runs on a thread of its own with a time limit, at most two at once.

The C2PA parser is native code: a parse that never returns cannot be interrupted. One past its time limit is
abandoned, its thread left behind, and the next parse starts on a fresh thread, so a hang costs its own image's
manifest, not the rest of the process's (pipeline/core/timed_calls.py). While MAX_ABANDONED of them are still
stuck, no parse starts (`provenance.c2pa_unavailable`, at once) until some end: hangs cannot pile up threads.

The C2PA parse never fetches anything: remote manifests and OCSP are turned off, so an upload cannot make the
worker send a request. A signature is judged against the configured trust anchors only: `valid` when the manifest
is intact and its signer chains to one of them, `untrusted` when it is intact but signed by anyone else (anybody
can make a certificate), `invalid` when the manifest does not match the image or is damaged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import zlib
from dataclasses import asdict, dataclass, field
from functools import cached_property

from pipeline.core.timed_calls import CallTimeout, TimedCalls, TooManyStuck

log = logging.getLogger("item.provenance")

READER_VERSION = "provenance:1"
DEFAULT_TIMEOUT_S = 2.0
MAX_XMP_BYTES = 1024 * 1024  # XMP in a JPEG segment is at most 64 KiB; real packets are a few KiB
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # a manifest store with its thumbnails is tens to hundreds of KiB
MAX_SEGMENTS = 100_000  # container walks stop here: a file of tiny segments costs a bounded loop
C2PA_THREADS = 2  # parses running at once
MAX_ABANDONED = 4  # parses past their time limit whose threads may still run; at this many, C2PA is not read

# IPTC's digital source types that declare generation by a trained model (https://cv.iptc.org/newscodes/
# digitalsourcetype/): wholly generated, or a composite that includes generated parts.
AI_SOURCE_TYPES = frozenset({"trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia"})

_IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
_SOURCE_TYPE_KEY = f"{{{_IPTC_EXT}}}DigitalSourceType"
_SOURCE_TYPE_VALUE = re.compile(r"^[\x21-\x7e]{1,512}$")  # one URI (or bare code), printable, no spaces
_JPEG_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
_PNG_XMP_KEYWORD = b"XML:com.adobe.xmp"
_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "TIFF": "image/tiff", "GIF": "image/gif"}
_STATES = {"trusted": "valid", "valid": "untrusted", "invalid": "invalid"}  # c2pa's names → ours


@dataclass(frozen=True)
class ProvenanceError:
    code: str  # provenance.c2pa_invalid, provenance.xmp_invalid, provenance.timeout, ...
    message: str


@dataclass(frozen=True)
class C2paFinding:
    validation_state: str  # valid (signer trusted), untrusted (intact, unknown signer) or invalid
    claim_generator: str | None = None
    signer: str | None = None
    actions: list[dict] = field(default_factory=list)  # [{"action", "digital_source_type"}] declaring AI
    failures: list[str] = field(default_factory=list)  # the validator's failure codes, at most 10

    @property
    def ai_generated(self) -> bool:
        return bool(self.actions)


@dataclass(frozen=True)
class XmpFinding:
    digital_source_type: str | None  # the URI as written; None: a packet without one

    @property
    def ai_generated(self) -> bool:
        return source_type_code(self.digital_source_type) in AI_SOURCE_TYPES


@dataclass(frozen=True)
class Provenance:
    c2pa: C2paFinding | None = None  # None: no manifest (or none that could be read: see errors)
    xmp: XmpFinding | None = None  # None: no XMP packet
    errors: list[ProvenanceError] = field(default_factory=list)
    c2pa_present: bool = False  # C2PA data found, whether or not it could be read

    @property
    def declared_by(self) -> list[str]:
        """The sources whose declaration of AI generation is intact: a C2PA manifest that is not invalid, XMP."""
        sources = []
        if self.c2pa is not None and self.c2pa.ai_generated and self.c2pa.validation_state != "invalid":
            sources.append("c2pa")
        if self.xmp is not None and self.xmp.ai_generated:
            sources.append("xmp")
        return sources

    def to_dict(self) -> dict:
        c2pa = {"present": self.c2pa_present}
        if self.c2pa is not None:
            c2pa.update(asdict(self.c2pa), ai_generated=self.c2pa.ai_generated)
        xmp = {"present": self.xmp is not None}
        if self.xmp is not None:
            xmp.update(digital_source_type=self.xmp.digital_source_type, ai_generated=self.xmp.ai_generated)
        return {
            "c2pa": c2pa,
            "xmp": xmp,
            "declares_ai": bool(self.declared_by),
            "declared_by": self.declared_by,
            "errors": [asdict(error) for error in self.errors],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Provenance:
        c2pa, xmp = data.get("c2pa") or {}, data.get("xmp") or {}
        finding = None
        if "validation_state" in c2pa:
            names = ("validation_state", "claim_generator", "signer", "actions", "failures")
            finding = C2paFinding(**{name: c2pa[name] for name in names if name in c2pa})
        return cls(
            c2pa=finding,
            xmp=XmpFinding(xmp.get("digital_source_type")) if xmp.get("present") else None,
            errors=[ProvenanceError(**error) for error in data.get("errors", [])],
            c2pa_present=bool(c2pa.get("present")),
        )


def source_type_code(value: str | None) -> str | None:
    """`trainedAlgorithmicMedia` from `http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia`
    (C2PA and XMP write the URI; some tools write the bare code)."""
    return value.rstrip("/").rsplit("/", 1)[-1] if value else None


def deciding_reason(provenance: Provenance | None, policy: str) -> str | None:
    """Why the verdict is `fake` whatever the score, or None: under `trusted`, a manifest whose signer is trusted
    declares AI generation; under `declared`, also an intact manifest from an unknown signer, or the XMP packet
    (both can be written by anyone, and are trusted only because a real photo rarely claims to be generated)."""
    if provenance is None or policy == "off":
        return None
    c2pa = provenance.c2pa
    if c2pa is not None and c2pa.ai_generated and c2pa.validation_state == "valid":
        return "provenance.c2pa"
    if policy == "declared":
        return next((f"provenance.{source}" for source in provenance.declared_by), None)
    return None


class ProvenanceReader:
    """Reads `Provenance` from an image's bytes under one trust configuration (PEM trust anchors, or none)."""

    def __init__(self, trust_anchors: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.trust_anchors = trust_anchors or None
        self.timeout_s = timeout_s
        self._context = None
        self._context_pid = 0  # a context made before a fork is not the child's to use
        self._lock = threading.Lock()

    @cached_property  # asked for on every batch; the anchors and the library do not change under a reader
    def version(self) -> str:
        """The key stored provenance is kept under: the reader, the C2PA library and the trust anchors (a
        signature's state depends on them), so a new trust list is a fresh read, not a stale `untrusted`."""
        trust = hashlib.sha256(self.trust_anchors.encode()).hexdigest()[:12] if self.trust_anchors else "none"
        return f"{READER_VERSION}|c2pa={_c2pa_version()}|trust={trust}"

    def read(self, data: bytes, image_format: str) -> Provenance:
        """What `data` declares; never raises: whatever goes wrong reading untrusted bytes is an error in it."""
        try:
            return self._read(data, image_format)
        except Exception as error:  # a case no parser here foresaw: said, and the check goes on
            log.warning("provenance unreadable: %r", error, exc_info=True)
            return Provenance(errors=[ProvenanceError("provenance.unreadable", f"Provenance unreadable: {error!r}")])

    def _read(self, data: bytes, image_format: str) -> Provenance:
        errors: list[ProvenanceError] = []
        found = _locate(data, image_format, errors)
        xmp = _parse_xmp(found.xmp, errors) if found.xmp is not None else None
        c2pa = None
        if found.c2pa_bytes > MAX_MANIFEST_BYTES:
            limit = f"{found.c2pa_bytes:,} bytes, over the limit of {MAX_MANIFEST_BYTES:,}"
            errors.append(ProvenanceError("provenance.c2pa_too_large", f"The C2PA manifest store is {limit}."))
        elif found.c2pa_bytes or (found.c2pa_unlocated and b"c2pa" in data):
            c2pa = self._read_c2pa(data, image_format, errors)
        return Provenance(c2pa=c2pa, xmp=xmp, errors=errors, c2pa_present=bool(found.c2pa_bytes) or c2pa is not None)

    def _read_c2pa(self, data: bytes, image_format: str, errors: list[ProvenanceError]) -> C2paFinding | None:
        try:
            context = self._c2pa_context()
        except Exception as error:  # not installed, or trust anchors it cannot use: said, never fatal
            errors.append(ProvenanceError("provenance.c2pa_unavailable", f"C2PA cannot be read here: {error}"))
            return None
        try:
            report = _parses().run(_c2pa_report, (data, _MIME.get(image_format, ""), context), self.timeout_s)
        except CallTimeout:
            errors.append(ProvenanceError("provenance.timeout", f"The C2PA parse took over {self.timeout_s:g} s."))
            return None
        except TooManyStuck as error:
            message = f"C2PA is not read: {error} (a parser that never returns); it is read again once they end."
            errors.append(ProvenanceError("provenance.c2pa_unavailable", message))
            return None
        except Exception as error:  # the library's errors for damaged stores: a readable error, a scored image
            errors.append(ProvenanceError("provenance.c2pa_invalid", f"The C2PA manifest is unreadable: {error}"[:500]))
            return C2paFinding(validation_state="invalid")
        if report is None:
            return None
        finding = _finding(report)
        if finding.validation_state == "invalid":
            reasons = ", ".join(finding.failures) or "no reason given"
            errors.append(
                ProvenanceError("provenance.c2pa_invalid", f"The C2PA manifest does not validate: {reasons}.")
            )
        return finding

    def _c2pa_context(self):
        with self._lock:
            if self._context is None or self._context_pid != os.getpid():
                import c2pa

                verify = {"remote_manifest_fetch": False, "ocsp_fetch": False, "verify_trust": True}
                settings = {"verify": verify}
                if self.trust_anchors:
                    settings["trust"] = {"trust_anchors": self.trust_anchors}
                self._context = c2pa.Context(c2pa.Settings.from_dict(settings))
                self._context_pid = os.getpid()
            return self._context


# ---------------------------------------------------------------------------------------------- locating


@dataclass
class _Located:
    xmp: bytes | None = None  # the first XMP packet, as stored
    c2pa_bytes: int = 0  # size of the embedded C2PA manifest store
    c2pa_unlocated: bool = False  # a format whose segments are not walked here: C2PA may be anywhere


def _locate(data: bytes, image_format: str, errors: list[ProvenanceError]) -> _Located:
    walk = {"JPEG": _walk_jpeg, "PNG": _walk_png, "WEBP": _walk_riff}.get(image_format)
    if walk is None:
        return _Located(xmp=_scan_xmp(data, errors), c2pa_unlocated=True)
    found = _Located()
    walk(data, found, errors)
    return found


def _walk_jpeg(data: bytes, found: _Located, errors: list[ProvenanceError]) -> None:
    """APP1 segments carry XMP, APP11 segments the C2PA JUMBF boxes; both come before the first scan."""
    position = 2
    for _ in range(MAX_SEGMENTS):
        if position + 4 > len(data) or data[position] != 0xFF:
            return
        marker = data[position + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # fill bytes and markers without length
            position += 1 if marker == 0xFF else 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan, end of image: the metadata is before them
            return
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        segment = data[position + 4 : position + 2 + length]
        if length < 2 or len(segment) < length - 2:
            errors.append(ProvenanceError("provenance.truncated", "A JPEG metadata segment is cut short."))
            return
        if marker == 0xE1 and segment.startswith(_JPEG_XMP) and found.xmp is None:
            found.xmp = segment[len(_JPEG_XMP) :]
        elif marker == 0xEB and segment.startswith(b"JP"):
            found.c2pa_bytes += len(segment)
        position += 2 + length


def _walk_png(data: bytes, found: _Located, errors: list[ProvenanceError]) -> None:
    """An iTXt chunk with the XMP keyword carries XMP (maybe deflated), a caBX chunk the C2PA store."""
    position = 8
    for _ in range(MAX_SEGMENTS):
        if position + 8 > len(data):
            return
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        if len(body) < length:
            errors.append(ProvenanceError("provenance.truncated", f"The PNG chunk {kind!r} is cut short."))
            return
        if kind == b"iTXt" and body.startswith(_PNG_XMP_KEYWORD + b"\x00") and found.xmp is None:
            found.xmp = _png_text(body[len(_PNG_XMP_KEYWORD) + 1 :], errors)
        elif kind == b"caBX":
            found.c2pa_bytes += length
        elif kind == b"IEND":
            return
        position += 12 + length


def _png_text(rest: bytes, errors: list[ProvenanceError]) -> bytes | None:
    """An iTXt body after its keyword: compression flag and method, language and translated keyword, text."""
    if len(rest) < 2:
        errors.append(ProvenanceError("provenance.xmp_invalid", "The PNG XMP chunk has no text."))
        return None
    compressed, parts = rest[0] == 1, rest[2:].split(b"\x00", 2)
    if len(parts) < 3:
        errors.append(ProvenanceError("provenance.xmp_invalid", "The PNG XMP chunk is malformed."))
        return None
    text = parts[2]
    if not compressed:
        return text
    inflater = zlib.decompressobj()
    try:
        packet = inflater.decompress(text, MAX_XMP_BYTES + 1)  # at most this much, whatever the ratio
    except zlib.error as error:
        errors.append(ProvenanceError("provenance.xmp_invalid", f"The PNG XMP chunk does not inflate: {error}"))
        return None
    return packet


def _walk_riff(data: bytes, found: _Located, errors: list[ProvenanceError]) -> None:
    """WebP: chunks after the 12-byte RIFF header; `XMP ` holds XMP, `C2PA` the manifest store."""
    position = 12
    for _ in range(MAX_SEGMENTS):
        if position + 8 > len(data):
            return
        kind, length = data[position : position + 4], int.from_bytes(data[position + 4 : position + 8], "little")
        if position + 8 + length > len(data):
            errors.append(ProvenanceError("provenance.truncated", f"The WebP chunk {kind!r} is cut short."))
            return
        if kind == b"XMP " and found.xmp is None:
            found.xmp = data[position + 8 : position + 8 + length]
        elif kind == b"C2PA":
            found.c2pa_bytes += length
        position += 8 + length + (length & 1)


def _scan_xmp(data: bytes, errors: list[ProvenanceError]) -> bytes | None:
    """Formats not walked here (TIFF, GIF, BMP): XMP packets are plain text wherever they sit."""
    start = data.find(b"<x:xmpmeta")
    if start < 0:
        return None
    end = data.find(b"</x:xmpmeta>", start, start + MAX_XMP_BYTES + 64)
    if end < 0:
        errors.append(ProvenanceError("provenance.xmp_invalid", "The XMP packet has no end within the size limit."))
        return None
    return data[start : end + len(b"</x:xmpmeta>")]


# ---------------------------------------------------------------------------------------------- parsing


def _parse_xmp(packet: bytes, errors: list[ProvenanceError]) -> XmpFinding | None:
    """The packet's DigitalSourceType, written as an attribute of rdf:Description, or as an element holding the
    URI as text or as rdf:resource. Anything else (a list, a structure, two values, not a URI) is an error."""
    if len(packet) > MAX_XMP_BYTES:
        errors.append(ProvenanceError("provenance.xmp_too_large", f"The XMP packet is over {MAX_XMP_BYTES:,} bytes."))
        return None
    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import ParseError, fromstring

    try:
        root = fromstring(packet.rstrip(b"\x00 \t\r\n"), forbid_dtd=True)
    except (ParseError, DefusedXmlException, ValueError) as error:
        errors.append(ProvenanceError("provenance.xmp_invalid", f"The XMP packet is not well-formed XML: {error}"))
        return None
    values = []
    for element in root.iter():
        if _SOURCE_TYPE_KEY in element.attrib:
            values.append(element.attrib[_SOURCE_TYPE_KEY])
        if element.tag == _SOURCE_TYPE_KEY:
            if len(element):
                errors.append(ProvenanceError("provenance.xmp_invalid", "DigitalSourceType is not a single URI."))
                return XmpFinding(None)
            values.append(element.get(f"{{{_RDF}}}resource") or (element.text or "").strip())
    distinct = list(dict.fromkeys(values))
    if len(distinct) > 1 or (distinct and not _SOURCE_TYPE_VALUE.match(distinct[0])):
        shown = ", ".join(repr(value[:80]) for value in distinct[:3])
        errors.append(ProvenanceError("provenance.xmp_invalid", f"DigitalSourceType is not one URI: {shown}."))
        return XmpFinding(None)
    return XmpFinding(distinct[0] if distinct else None)


def _c2pa_report(data: bytes, mime: str, context) -> dict | None:
    """The manifest store as c2pa-python reports it, or None without one. Runs on the C2PA pool."""
    import io

    import c2pa

    reader = c2pa.Reader.try_create(mime or None, io.BytesIO(data), None, context)
    if reader is None:
        return None
    with reader:
        return json.loads(reader.json())


def _finding(report: dict) -> C2paFinding:
    manifest = report.get("manifests", {}).get(report.get("active_manifest") or "", {})
    if not isinstance(manifest, dict):
        manifest = {}
    state = _STATES.get(str(report.get("validation_state", "")).lower(), "invalid")
    results = (report.get("validation_results") or {}).get("activeManifest") or {}
    failures = [str(item.get("code")) for item in results.get("failure", []) if isinstance(item, dict)]
    return C2paFinding(
        validation_state=state,
        claim_generator=_claim_generator(manifest),
        signer=_signer(manifest.get("signature_info")),
        actions=_ai_actions(manifest.get("assertions")),
        failures=failures[:10],
    )


def _claim_generator(manifest: dict) -> str | None:
    infos = manifest.get("claim_generator_info")
    if isinstance(infos, list) and infos and isinstance(infos[0], dict):
        name, version = infos[0].get("name"), infos[0].get("version")
        return _short(f"{name} {version}" if version else name)
    return _short(manifest.get("claim_generator"))


def _signer(info) -> str | None:
    if not isinstance(info, dict):
        return None
    name, issuer = info.get("common_name"), info.get("issuer")
    return _short(f"{name} ({issuer})" if name and issuer else name or issuer)


def _ai_actions(assertions) -> list[dict]:
    """The actions of the active manifest whose digital source type declares generation by a trained model."""
    found = []
    for assertion in assertions if isinstance(assertions, list) else []:
        if not isinstance(assertion, dict) or not str(assertion.get("label", "")).startswith("c2pa.actions"):
            continue
        actions = (assertion.get("data") or {}).get("actions") if isinstance(assertion.get("data"), dict) else None
        for action in actions if isinstance(actions, list) else []:
            code = source_type_code(action.get("digitalSourceType")) if isinstance(action, dict) else None
            if isinstance(code, str) and code in AI_SOURCE_TYPES:
                found.append({"action": _short(action.get("action")), "digital_source_type": code})
    return found[:10]


def _short(value, limit: int = 200) -> str | None:
    """A string from a manifest, cut to `limit`: whatever an upload wrote is stored and shown bounded."""
    return str(value)[:limit] if value else None


def _c2pa_version() -> str:
    try:
        import c2pa

        return c2pa.sdk_version()
    except Exception:  # not installed: provenance still reads XMP
        return "none"


_parses_now: TimedCalls | None = None
_parses_pid = 0
_parses_lock = threading.Lock()


def _parses() -> TimedCalls:
    """The C2PA parses of this process: a child of a fork has none of its parent's threads, stuck or not."""
    global _parses_now, _parses_pid
    with _parses_lock:
        if _parses_now is None or _parses_pid != os.getpid():
            _parses_now = TimedCalls("item-c2pa", C2PA_THREADS, MAX_ABANDONED)
            _parses_pid = os.getpid()
        return _parses_now
