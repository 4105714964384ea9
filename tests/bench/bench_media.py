"""Decode cost per upload of animations and videos sampled by the default frame rule, against one still JPEG.

Run on demand, never as a timed test:
    python -m tests.bench.bench_media --repeat 5 --json

Inputs, made here in memory (`tests.media_files`), with a moving gradient so the codecs have real work to do:
a 10 s 640x360 30 fps MP4 (H.264) and WebM (VP9), a 50-frame 320x240 GIF, and a 1024x768 JPEG. Prints the
median milliseconds of `decode_image(data, frames=FrameRule())` (decode and sample 8 frames) of `--repeat`
rounds, one thread, and the ratio to the JPEG's.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import statistics
import time

import numpy as np
from PIL import Image

from pipeline.core.imaging import decode_image
from pipeline.core.media import FrameRule
from tests import media_files as m


def _moving(i: int, size: tuple[int, int]) -> np.ndarray:
    x = np.linspace(0, 255, size[0], dtype=np.float32)[None, :]
    y = np.linspace(0, 255, size[1], dtype=np.float32)[:, None]
    pixels = np.empty((size[1], size[0], 3), np.uint8)
    pixels[..., 0] = (x + 4 * i) % 256
    pixels[..., 1] = (y + 2 * i) % 256
    pixels[..., 2] = (x + y + i) % 256
    return pixels


def _video(fmt: str, codec: str) -> bytes:
    import av

    size, buffer = (640, 360), io.BytesIO()
    with av.open(buffer, "w", format=m.CONTAINERS[fmt]) as container:
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        if codec == "libvpx-vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
        for i in range(300):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_moving(i, size), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _gif() -> bytes:
    frames = [Image.fromarray(_moving(i, (320, 240))) for i in range(50)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    return buffer.getvalue()


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_moving(0, (1024, 768))).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    inputs = {
        "mp4 h264 10s 640x360 30fps": _video("mp4", "libx264"),
        "webm vp9 10s 640x360 30fps": _video("webm", "libvpx-vp9"),
        "gif 50 frames 320x240": _gif(),
        "jpeg 1024x768 (still)": _jpeg(),
    }
    rule, rows = FrameRule(), []
    for name, data in inputs.items():
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            decoded = decode_image(data, frames=rule, max_pixels=50_000_000)
            times.append((time.perf_counter() - started) * 1000)
        rows.append({"input": name, "bytes": len(data), "frames": len(decoded.frames) or 1,
                     "ms": round(statistics.median(times), 2)})  # fmt: skip
    still = rows[-1]["ms"]
    for row in rows:
        row["x_jpeg"] = round(row["ms"] / still, 1)
    report = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "load": os.getloadavg(),
              "cpus": os.cpu_count(), "rule": rule.id, "repeat": args.repeat, "rows": rows}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{'input':30} {'bytes':>10} {'frames':>6} {'ms':>9} {'x jpeg':>7}")
    for row in rows:
        print(f"{row['input']:30} {row['bytes']:>10,} {row['frames']:>6} {row['ms']:>9.2f} {row['x_jpeg']:>7}")


if __name__ == "__main__":
    main()
