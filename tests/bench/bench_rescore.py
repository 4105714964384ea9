"""Re-scoring after a head-only upgrade against checking the same images from scratch, through the service.

Run on demand, never as a timed test:
    python -m tests.bench.bench_rescore --profile tiny --images 256 --device cpu [--database-url URL]

Both runs go through the real check service in-process (ledger writes, claims, batching, artifact reuse); only
the broker is left out, which both would pay alike. Checks are recorded before the worker runs, so its claims
batch them as under load. First N inline images are checked from scratch under one
head (models loaded beforehand, outside the clock); then a second head is registered and `item rescore`'s
queueing re-scores all N under it. Prints both rates, their ratio, and how many images each model stage saw
during the re-score (zero for all three when only the head changed). The ledger is a new SQLite file unless
--database-url names an empty database (a Postgres one is migrated first).
"""

from __future__ import annotations

import argparse
import base64
import json
import tempfile
import time
from pathlib import Path

from pipeline.core.defaults import DEFAULT_MODEL_DIR
from pipeline.core.detector import Detector
from pipeline.core.head import Head, HeadMetadata
from pipeline.core.model_store import ModelStore
from pipeline.core.profiles import get_profile
from pipeline.lab.synthetic import make_image
from tests.conftest import count_stage_images, encode
from worker import rescore
from worker.gpu.embedded import InProcess
from worker.intake.filing import CheckRequest
from worker.ledger import migrate
from worker.ledger.store import RescoreSelection
from worker.settings import Settings


def run(args: argparse.Namespace) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="item-bench-rescore-"))
    database_url = args.database_url or f"sqlite:///{folder / 'ledger.sqlite3'}"
    migrate.upgrade(database_url)
    store = ModelStore(args.model_dir)
    probe = Detector(get_profile(args.profile), store, device=args.device)
    heads = [_head(probe, seed).save(folder / f"head-{seed}.safetensors") for seed in (0, 1)]
    settings = Settings(
        profile=args.profile,
        model_dir=args.model_dir,
        device=args.device,
        database_url=database_url,
        batch_size=args.batch_size,
        batch_max_wait_s=0,
        head=heads[0],
    )
    scratch = InProcess(settings)
    scratch.service.detector.load()  # loading is a one-off per worker, not a cost per check
    ids = _submitted(scratch, settings, args.images)
    scratch_s = _timed(lambda: scratch.finish(ids))

    upgraded = InProcess(settings.model_copy(update={"head": heads[1]}))
    upgraded.service.detector.load()
    stage_images = count_stage_images(upgraded.service.detector)
    ledger, version = upgraded.service.ledger, upgraded.service.version_id
    outcome: dict = {}

    def rescore_all() -> None:
        run = outcome["run"] = rescore.queue(ledger, RescoreSelection(), version_id=version)
        outcome["queue_s"] = time.perf_counter() - started
        upgraded.loop.run_until(lambda: rescore.refresh(ledger, run).pending == 0)

    started = time.perf_counter()
    rescore_s = _timed(rescore_all)
    done = outcome["run"].counts()["done"]
    return {
        "profile": args.profile,
        "device": str(probe.device),
        "database": database_url.split(":", 1)[0],
        "images": args.images,
        "batch_size": args.batch_size,
        "rescore_batch_size": settings.rescore_batch_size,
        "scratch_s": round(scratch_s, 3),
        "scratch_per_s": round(args.images / scratch_s, 1),
        "rescore_s": round(rescore_s, 3),
        "rescore_per_s": round(args.images / rescore_s, 1),
        "rescore_ms_per_check": round(1000 * rescore_s / args.images, 2),
        "queue_ms_per_check": round(1000 * outcome["queue_s"] / args.images, 2),  # `item rescore` filing them
        "ratio": round(scratch_s / rescore_s, 1),
        "rescored_done": done,
        "stage_images_during_rescore": {stage: stage_images[stage] for stage in ("caption", "ground", "embed")},
    }


def _head(detector: Detector, seed: int) -> Head:
    metadata = HeadMetadata(
        profile=detector.profile.name,
        stage_versions=detector.stage_versions,
        input_dim=detector.embedder.dim,
        hidden=256,
    )
    return Head.create(metadata, seed=seed)


def _submitted(runner: InProcess, settings: Settings, count: int) -> list[str]:
    """N checks recorded first, as `item submit` does, so the worker's claims batch them as under load."""
    requests = []
    for index in range(count):
        image = make_image(("smooth", "patterned")[index % 2], seed=index)
        requests.append(CheckRequest(f"bench-{index}", {"b64": base64.b64encode(encode(image)).decode()}))
    filed = runner.intake.file(requests, version_id=runner.service.version_id)
    return [one.check.id for one in filed]


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--database-url", default=None, help="An empty database; default: a new SQLite file.")
    print(json.dumps(run(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
