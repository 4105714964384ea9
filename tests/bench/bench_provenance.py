"""What reading provenance adds to each image: the container walk, the XMP parse and the C2PA parse, against
decoding the same bytes.

Run on demand, never as a timed test:
    python -m tests.bench.bench_provenance --side 1024 --repeat 20

Builds its own files in memory (synthetic photos as JPEG and PNG, without metadata, with an XMP packet, and with a
C2PA manifest signed by a certificate made here), then times `ProvenanceReader.read` and `decode_image` on each in
the same process, taking turns, and prints the median milliseconds of each and their ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from datetime import UTC, datetime

import numpy as np
from PIL import Image

from pipeline.core.imaging import decode_image
from pipeline.core.provenance import ProvenanceReader
from pipeline.lab.synthetic import FAMILIES, make_image
from tests import provenance_files as files


def _photo(side: int, image_format: str) -> bytes:
    """A synthetic photo scaled up to `side`, with sensor-like noise so that it compresses like a photo (the C2PA
    parse hashes every byte): its size, not its content, is what is measured here."""
    smooth = make_image(FAMILIES[0], seed=1).resize((side, side * 3 // 4), Image.Resampling.BICUBIC)
    noise = np.random.default_rng(0).normal(0, 12, (smooth.height, smooth.width, 3))
    image = Image.fromarray(np.clip(np.asarray(smooth, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, image_format, **({"quality": 90} if image_format == "JPEG" else {}))
    return buffer.getvalue()


def _cases(side: int) -> tuple[dict[str, tuple[bytes, str]], str]:
    creds = files.credentials()
    jpeg, png = _photo(side, "JPEG"), _photo(side, "PNG")
    return {
        "jpeg, none": (jpeg, "JPEG"),
        "jpeg, xmp": (files.jpeg_with_xmp(files.xmp_packet(), jpeg), "JPEG"),
        "jpeg, c2pa": (files.signed(jpeg, creds), "JPEG"),
        "png, none": (png, "PNG"),
        "png, xmp": (files.png_with_xmp(files.xmp_packet(), png), "PNG"),
        "png, c2pa": (files.signed(png, creds, "image/png"), "PNG"),
    }, creds.ca_pem


def _ms(work, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=1024, help="Longer side of the synthetic photos, in pixels.")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cases, anchors = _cases(args.side)
    reader = ProvenanceReader(anchors)
    rows = []
    for name, (data, image_format) in cases.items():
        reader.read(data, image_format)  # warm: the C2PA context and threads are made once per process
        provenance = _ms(lambda data=data, fmt=image_format: reader.read(data, fmt), args.repeat)
        decode = _ms(lambda data=data: decode_image(data), args.repeat)
        found = reader.read(data, image_format).to_dict()
        rows.append({"case": name, "bytes": len(data), "provenance_ms": round(provenance, 3),
                     "decode_ms": round(decode, 3), "ratio": round(provenance / decode, 4),
                     "declared_by": found["declared_by"], "errors": [e["code"] for e in found["errors"]]})  # fmt: skip
    meta = {"date": datetime.now(UTC).date().isoformat(), "machine": platform.processor() or platform.machine()}
    if args.json:
        print(json.dumps({**meta, "side": args.side, "rows": rows}, indent=2))
        return
    print(f"{meta['date']} · {meta['machine']} · {args.side} px · median of {args.repeat}")
    print(f"{'case':12} {'bytes':>9} {'provenance ms':>14} {'decode ms':>10} {'ratio':>7}  declared by")
    for row in rows:
        print(f"{row['case']:12} {row['bytes']:>9,} {row['provenance_ms']:>14.3f} {row['decode_ms']:>10.2f} "
              f"{row['ratio']:>7.3f}  {', '.join(row['declared_by']) or '-'}")  # fmt: skip


if __name__ == "__main__":
    main()
