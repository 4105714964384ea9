#!/usr/bin/env bash
# The Python packages the device check needs that the GPU machine lacks, as wheels in .device/wheels/.
#
#     bash tests/bench/device_wheels.sh          # here, where the package registry is reachable
#
# The GPU machine (Python 3.12, torch 2.11, transformers 5.17; README, "Device check: the prepared command") has no
# network. `tests/bench/device_check.sh` installs these wheels there with `pip install --no-index --no-deps`, so
# every package the import path needs is named here, each at one version, and nothing else: the machine's own
# torch, transformers, numpy, pillow, timm, huggingface_hub, regex, tqdm, typer, rich, markupsafe... are used.
#
# What needs what (read off `python -X importtime` of `item scan --profile tiny`, and of the modules the in-process
# service imports: worker.gpu.embedded, worker.ledger.migrate, worker.intake.filing):
#   open_clip_torch, ftfy, wcwidth           the CLIP stage (pipeline/core/stages/embed.py)
#   pydantic, pydantic-core, pydantic-settings, annotated-types, typing-inspection, python-dotenv
#                                            worker.settings, which `item scan` reads its options through
#   SQLAlchemy                               worker.gpu.build imports the ledger's store (item scan and bench_feed)
#   alembic, Mako                            the SQLite ledger's migrations (bench_feed --mode embedded)
#   defusedxml                               provenance reading (XMP), on for every scanned image
#   typing_extensions                        pydantic and SQLAlchemy need a recent one; the machine's may be older
# Not needed: celery, kombu, redis, psycopg (nothing on this path imports them: `item` imports them only in the
# commands that use a broker or Postgres), c2pa-python (imported only when an image carries a C2PA manifest).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.device/wheels
rm -rf "$DEST"
mkdir -p "$DEST"
PYTHON=${PYTHON:-python3}
# The versions CI's environment resolves today (pip show in .venv); one version of each.
PACKAGES=(
  open_clip_torch==3.3.0
  ftfy==6.3.1
  wcwidth==0.9.5
  pydantic==2.14.4
  pydantic_core==2.50.5
  pydantic-settings==2.16.3
  annotated-types==0.8.0
  typing-inspection==0.4.5
  python-dotenv==1.2.4
  SQLAlchemy==2.1.9
  alembic==1.20.1
  Mako==1.4.3
  defusedxml==0.7.1
  typing_extensions==4.16.0
  prometheus_client==0.26.0  # bench_feed's embedded mode runs the worker's GPU loop, which counts its metrics
)
# PIP_CONSTRAINT is emptied: this machine's global constraints are for its own Python, not the device's.
PIP_CONSTRAINT= "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$DEST" "${PACKAGES[@]}"
count=$(find "$DEST" -name '*.whl' | wc -l)
if [ "$count" -ne "${#PACKAGES[@]}" ]; then
  echo "expected ${#PACKAGES[@]} wheels, got $count:" >&2
  ls "$DEST" >&2
  exit 1
fi
ls -l "$DEST"
du -sh "$DEST"
echo "carry .device to the GPU machine (64 MiB limit for the whole tree): run(..., carry=[\".device\"])"
