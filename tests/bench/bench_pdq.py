"""PDQ near duplicates, measured (on demand, never in the suite):

1. ms per image of `pdq_of` against decoding the same JPEG (1024x768, 3000x2000);
2. false matches among thousands of distinct generated images (pairs within each distance 8..31), and how far
   each transform of tests/unit/test_pdq.py moves a copy (p50/p95/max): the default distance is the largest
   ≤ 23 with no false match;
3. `near.find` for 1 and 32 query hashes over 1M (and 10M) stored hashes on PostgreSQL: median and p95 ms, the
   table and index sizes, the insert cost per row.

    python -m tests.bench.bench_pdq --images 3000 --rows 1000000 10000000 [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from datetime import timedelta

import numpy as np
import pdqhash
import sqlalchemy as sa
from PIL import Image

from pipeline.core import pdq
from tests.integration.conftest import temporary_postgres_database
from tests.unit.test_pdq import CROPS, TRANSFORMS, natural_image
from worker.ledger import migrate, near
from worker.ledger.engine import make_engine
from worker.ledger.near import NearEntry

TENANT, VERSION = "t1", "pv-bench"
PLANTED = 300


def _ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def hashing_cost() -> list[dict]:
    return [_hashing_cost(size) for size in ((1024, 768), (3000, 2000))]


def _hashing_cost(size: tuple[int, int]) -> dict:
    buffer = io.BytesIO()
    natural_image(1, size).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    return {
        "size": f"{size[0]}x{size[1]}",
        "decode_ms": _ms(lambda: Image.open(io.BytesIO(data)).convert("RGB"), 10),
        "pdq_of_ms": _ms(lambda: pdq.pdq_of(decoded), 10),
        "pdqhash_full_ms": _ms(lambda: pdqhash.compute(np.asarray(decoded)), 10),  # threatexchange's way
    }


def _bit_rows(hashes: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(hashes), dtype=np.uint64).reshape(len(hashes), 4)


def false_matches(count: int) -> dict[int, int]:
    """Pairs of distinct images within each distance 8..31."""
    words = _bit_rows([pdq.pdq_of(natural_image(100_000 + seed))[0] for seed in range(count)])
    within = dict.fromkeys(range(8, 32), 0)
    for i in range(count - 1):
        distances = np.bitwise_count(words[i] ^ words[i + 1 :]).sum(axis=1)
        for distance in within:
            within[distance] += int((distances <= distance).sum())
    return within


def copy_distances(count: int) -> dict[str, dict]:
    result = {}
    images = [natural_image(200_000 + seed) for seed in range(count)]
    originals = [pdq.pdq_of(image)[0] for image in images]
    for name, transform in {**TRANSFORMS, **CROPS}.items():
        distances = [
            pdq.hamming(h, pdq.pdq_of(transform(image))[0]) for h, image in zip(originals, images, strict=True)
        ]
        result[name] = {
            "p50": float(np.percentile(distances, 50)), "p95": float(np.percentile(distances, 95)),
            "max": max(distances),
        }  # fmt: skip
    return result


def _chunk_sql(position: int) -> str:
    part = f"substr(encode(h, 'hex'), {8 * position + 1}, 8)"
    return f"(({position}::bigint << 32) | ('x' || lpad({part}, 16, '0'))::bit(64)::bigint)"


def _fill(engine: sa.Engine, rows: int) -> float:
    """`rows` random hashes, made server-side (two md5s a hash), the GIN index built after. Seconds taken."""
    chunks = ", ".join(_chunk_sql(position) for position in range(pdq.CHUNKS))
    start = time.perf_counter()
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP INDEX ix_near_hashes_chunks")
        for first in range(0, rows, 1_000_000):
            connection.exec_driver_sql(
                "INSERT INTO near_hashes (tenant_id, pipeline_version_id, check_id, image_sha256, pdq, chunks, "
                f"created_at) SELECT '{TENANT}', '{VERSION}', g::text, md5(g::text), h, ARRAY[{chunks}], now() "
                "FROM (SELECT g, decode(md5(g::text || 'a') || md5(g::text || 'b'), 'hex') AS h "
                f"FROM generate_series({first + 1}, {min(first + 1_000_000, rows)}) AS g) AS s"
            )
        connection.exec_driver_sql("CREATE INDEX ix_near_hashes_chunks ON near_hashes USING gin (chunks)")
        connection.exec_driver_sql("ANALYZE near_hashes")
    return time.perf_counter() - start


def _latency(engine: sa.Engine, copies: list[bytes], size: int, distance: int, repeat: int = 30) -> dict:
    times, found = [], 0
    with engine.connect() as connection, sa.orm.Session(connection) as session:
        for n in range(repeat):
            batch = {str(i): copies[(n * size + i) % PLANTED] for i in range(size)}
            start = time.perf_counter()
            found = len(near.find(session, TENANT, VERSION, batch, distance))
            times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": statistics.median(times), "p95_ms": float(np.percentile(times, 95)), "found": found}


def lookup(rows: int, distance: int) -> dict:
    images = [natural_image(300_000 + seed) for seed in range(PLANTED)]
    copies = [pdq.pdq_of(TRANSFORMS["jpeg50"](TRANSFORMS["resize0.75x"](image)))[0] for image in images]
    with temporary_postgres_database() as url:
        migrate.upgrade(url)
        engine = make_engine(url)
        try:
            fill_s = _fill(engine, rows)
            planted = [NearEntry(TENANT, VERSION, f"planted{n}", f"p{n}", pdq.pdq_of(image)[0])
                       for n, image in enumerate(images)]  # fmt: skip
            with sa.orm.Session(engine) as session, session.begin():
                start = time.perf_counter()
                for first in range(0, PLANTED, 32):
                    near.record(session, planted[first : first + 32])
                insert_ms = (time.perf_counter() - start) * 1000 / PLANTED
            result = {"rows": rows, "fill_s": fill_s, "insert_ms_per_row_in_batches_of_32": insert_ms}
            for size in (1, 32):
                result[f"find_{size}"] = _latency(engine, copies, size, distance)
            with engine.connect() as connection:
                size_of = lambda name: connection.exec_driver_sql(f"SELECT pg_relation_size('{name}')").scalar()  # noqa: E731
                result["table_mb"] = size_of("near_hashes") / 2**20
                result["gin_mb"] = size_of("ix_near_hashes_chunks") / 2**20
                with sa.orm.Session(connection) as session:
                    result["purged_none"] = near.purge(session, timedelta(days=1), 10) == 0
        finally:
            engine.dispose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="distinct images for the false-match count")
    parser.add_argument("--copies", type=int, default=200, help="images each transform is applied to")
    parser.add_argument("--rows", type=int, nargs="*", default=[1_000_000], help="stored hashes (none: skip)")
    parser.add_argument("--distance", type=int, help="max distance of the lookups (default: the chosen one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = {"hashing": hashing_cost(), "false_matches": false_matches(args.images)}
    report["copies"] = copy_distances(args.copies)
    report["chosen_distance"] = max(d for d, n in report["false_matches"].items() if d <= 23 and n == 0)
    distance = args.distance if args.distance is not None else report["chosen_distance"]
    report["lookups"] = [lookup(rows, distance) for rows in args.rows]
    print(json.dumps(report, indent=2) if args.json else _table(report, args.images))


def _table(report: dict, images: int) -> str:
    lines = ["size        decode ms  pdq_of ms  pdqhash(full) ms"]
    lines += [f"{r['size']:<11} {r['decode_ms']:9.1f} {r['pdq_of_ms']:10.1f} {r['pdqhash_full_ms']:17.1f}"
              for r in report["hashing"]]  # fmt: skip
    pairs = images * (images - 1) // 2
    lines.append(f"\nfalse matches among {images} images ({pairs} pairs), by distance:")
    lines.append("  " + " ".join(f"{d}:{n}" for d, n in report["false_matches"].items()))
    lines.append(f"chosen default distance: {report['chosen_distance']}\n\ntransform        p50   p95   max")
    lines += [f"{name:<15} {v['p50']:5.0f} {v['p95']:5.0f} {v['max']:5d}" for name, v in report["copies"].items()]
    for result in report["lookups"]:
        lines.append(
            f"\n{result['rows']:,} hashes: fill {result['fill_s']:.0f} s, table {result['table_mb']:.0f} MiB, "
            f"GIN {result['gin_mb']:.0f} MiB, insert {result['insert_ms_per_row_in_batches_of_32']:.2f} ms/row"
        )
        for size in (1, 32):
            found = result[f"find_{size}"]
            lines.append(f"  find {size:>2}: median {found['median_ms']:.1f} ms, p95 {found['p95_ms']:.1f} ms, "
                         f"found {found['found']}/{size}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
