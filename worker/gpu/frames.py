"""A video's or an animated image's frames on their way through a batch.

Each sampled frame is scored like an image: it is stored under its own key (`pipeline.core.media.frame_key`) with
its own artifacts, and the frames of many uploads share the batch's model runs. What the ledger keeps of the upload
(`listing`) names its frames, so a re-score after a head upgrade loads their stored features without decoding the
upload again. The check's answer aggregates its frames (`media_result`):

    p(fake) of the check = the k-th highest p(fake) of its frames, k = ITEM_VIDEO_FLAG_FRAMES (2), or the lowest when
    it has fewer frames than k; the verdict follows from it with the head's thresholds.

So a check is `fake` exactly when at least k of its frames are over the threshold: one odd frame (a motion blur, a
title card) does not flag a video, two do. Its caption and objects are those of its most suspicious frame, and
every frame's time, p(fake), verdict, caption and objects are in `media.frames`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.core.results import verdict
from worker.gpu.outcomes import result_of_detection

if TYPE_CHECKING:
    from pipeline.core.imaging import DecodedImage
    from pipeline.core.results import Detection

AGGREGATION = "kth_highest"
MEDIA_KINDS = ("video", "animation")


def is_media(image: DecodedImage | None) -> bool:
    return image is not None and image.kind in MEDIA_KINDS


def listing(image: DecodedImage) -> dict:
    """What the ledger keeps of a sampled upload: enough to find its frames' artifacts again, no pixels."""
    return {
        "kind": image.kind,
        "format": image.format,
        "duration_s": image.duration_s,
        "frame_rule": image.frame_rule,
        "frames": [{"index": f.index, "time_s": f.time_s, "sha256": f.key} for f in image.frames],
    }


def frame_keys(media: dict) -> list[str]:
    return [frame["sha256"] for frame in media["frames"]]


def stored_listing(media: dict | None, rule_id: str | None) -> dict | None:
    """A listing the ledger holds, if it was sampled by the rule in force (another rule samples other frames)."""
    if not media or rule_id is None or media.get("frame_rule") != rule_id:
        return None
    return media


def units(upload: DecodedImage | None, media: dict | None, sha256: str) -> dict[str, DecodedImage | None]:
    """What the models run for one check, by key: its frames (pixels, or None where their features are stored and
    the upload was not decoded), or its image (None where its features are stored)."""
    if is_media(upload):
        from pipeline.core.media import frame_images

        return {frame.sha256: frame for frame in frame_images(upload)}
    if media is not None:
        return dict.fromkeys(frame_keys(media))
    return {sha256: upload}


def media_result(upload_sha: str, media: dict, detections: dict[str, Detection], flag_frames: int) -> dict:
    """A check's result from its frames' detections (see the module's note), with every frame's evidence."""
    frames = [(frame, detections[frame["sha256"]]) for frame in media["frames"]]
    ranked = sorted(frames, key=lambda pair: -pair[1].p_fake)
    k = min(flag_frames, len(ranked))
    first = ranked[0][1]
    p_fake = ranked[k - 1][1].p_fake
    result = result_of_detection(first, upload_sha)  # the most suspicious frame's caption, objects, attribution
    result |= {
        "p_fake": p_fake,
        "verdict": verdict(p_fake, first.threshold, first.threshold_low),
        "provenance": None,  # read from still images' bytes only
        "timings_ms": _summed([d.timings_ms for _, d in frames]),
        "media": {
            **{key: media[key] for key in ("kind", "format", "duration_s", "frame_rule")},
            "aggregation": {
                "rule": AGGREGATION,
                "k": k,
                "flagged": sum(d.verdict == "fake" for _, d in frames),
                "frames": len(frames),
            },
            "frames": [_frame_evidence(frame, d) for frame, d in frames],
        },
    }
    return result


def _frame_evidence(frame: dict, detection: Detection) -> dict:
    evidence = detection.to_dict()
    return {
        "index": frame["index"],
        "time_s": frame["time_s"],
        "sha256": frame["sha256"],
        "p_fake": evidence["p_fake"],
        "verdict": evidence["verdict"],
        "caption": evidence["caption"],
        "objects": evidence["objects"],
    }


def _summed(timings: list[dict[str, float]]) -> dict[str, float]:
    """A check's stage times: the sum over its frames (what the upload cost the device)."""
    total: dict[str, float] = {}
    for per_frame in timings:
        for stage, ms in per_frame.items():
            total[stage] = round(total.get(stage, 0.0) + ms, 2)
    return total
