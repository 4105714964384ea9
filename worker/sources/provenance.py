"""What reads each image's provenance (C2PA manifests, XMP) under the service's settings."""

from __future__ import annotations

from pipeline.core.errors import ItemError
from worker.settings import Settings


def provenance_reader(settings: Settings):
    """What reads each image's provenance under these settings (the trust anchors' file read now), or None."""
    from pipeline.core.provenance import ProvenanceReader

    if not settings.read_provenance:
        return None
    anchors = None
    if settings.c2pa_trust_anchors is not None:
        try:
            anchors = settings.c2pa_trust_anchors.expanduser().read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise ItemError(
                f"ITEM_C2PA_TRUST_ANCHORS: cannot read {settings.c2pa_trust_anchors}: {error}", code="settings.invalid"
            ) from None
        if "-----BEGIN CERTIFICATE-----" not in anchors:
            message = f"ITEM_C2PA_TRUST_ANCHORS: {settings.c2pa_trust_anchors} holds no PEM certificate."
            raise ItemError(message, code="settings.invalid")
    return ProvenanceReader(anchors, settings.provenance_timeout_s)
