"""Videos per minute through the check service on the tiny profile: filed, read, decoded and sampled, every frame
through the model stages, aggregated and stored, as the embedded mode runs them (no broker; the ledger is real).

Run on demand, never as a timed test:
    python -m tests.bench.bench_videos --videos 24 --frames 8 --json
    python -m tests.bench.bench_videos --database-url postgresql+psycopg://127.0.0.1/test   # a throwaway schema's DB

Each video is its own 10 s 320x240 30 fps H.264 clip (its own colours, changing every frame, so every one is new
bytes and no answer is reused); as many still JPEGs of the same colours run after them, for the ratio in one run.
The tiny models are tiny: what this measures is the host side a video adds (decoding, sampling, a frame per image
through the batch), not a GPU's throughput (README, "Keeping a GPU busy").
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from pipeline.core.detector import Detector, untrained_head
from pipeline.core.model_store import ModelStore
from pipeline.core.profiles import get_profile
from tests import media_files
from worker.gpu.batches import CheckService
from worker.gpu.embedded import InProcess
from worker.intake.filing import CheckRequest
from worker.ledger import migrate
from worker.ledger.store import Ledger
from worker.settings import Settings


def colour(seed: int, i: int) -> tuple[int, int, int]:
    """Frame i of clip `seed`: every clip its own colours, so no two uploads share bytes or frames."""
    return (seed * 37 + 4 * i) % 256, (seed * 11 + 2 * i) % 256, (seed * 5 + i) % 256


def clip(seed: int, seconds: int = 10, fps: int = 30, size=(320, 240)) -> bytes:
    return media_files.video_bytes("mp4", frames=seconds * fps, fps=fps, size=size, colors=lambda i: colour(seed, i))


def still(seed: int, size=(320, 240)) -> bytes:
    """A JPEG like one frame of clip `seed`: the stills' models see what the videos' frames show."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour(seed, 0)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def run(uploads: list[bytes], folder: Path, runner: InProcess, prefix: str) -> float:
    """Seconds from filing `uploads` to the last one ending."""
    requests = []
    for index, data in enumerate(uploads):
        path = folder / f"{prefix}-{index}"
        path.write_bytes(data)
        requests.append(CheckRequest(f"{prefix}-{index}", {"path": str(path)}))
    started = time.perf_counter()
    filed = runner.submit(requests)
    runner.finish([one.check.id for one in filed])
    elapsed = time.perf_counter() - started
    with runner.service.ledger.session() as session:
        rows = runner.service.ledger.checks_by_id(session, [one.check.id for one in filed])
    statuses = {row.status for row in rows}
    if statuses != {"done"}:
        raise SystemExit(f"not every check was done: {statuses}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--frames", type=int, default=8, help="ITEM_VIDEO_FRAMES")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--database-url", default=None, help="default: a SQLite file in a temporary folder")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        url = args.database_url or f"sqlite:///{folder / 'ledger.sqlite3'}"
        migrate.upgrade(url)
        detector = Detector(get_profile("tiny"), ModelStore(folder / "models", allow_download=False), device="cpu")
        detector.use_head(untrained_head(detector))
        settings = Settings(
            database_url=url, batch_size=args.batch_size, batch_max_wait_s=0, allowed_path_roots=[folder],
            video_frames=args.frames, near_duplicates=False,
        )  # fmt: skip
        runner = InProcess(settings, CheckService(settings, Ledger(url), detector))
        run([still(10_000)], folder, runner, "warm")  # models loaded, version registered
        videos = [clip(seed) for seed in range(args.videos)]
        stills = [still(seed) for seed in range(args.videos)]
        video_s = run(videos, folder, runner, "video")
        still_s = run(stills, folder, runner, "still")
    report = {
        "date": datetime.date.today().isoformat(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "videos": args.videos,
        "frames_per_video": args.frames,
        "videos_per_minute": round(60 * args.videos / video_s, 1),
        "frames_per_s": round(args.videos * args.frames / video_s, 1),
        "stills_per_minute": round(60 * args.videos / still_s, 1),
        "video_s": round(video_s, 2),
        "still_s": round(still_s, 2),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        print(f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
