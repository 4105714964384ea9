#!/usr/bin/env bash
# The prepared device check (README, "Device check: the prepared command"): everything one call on the GPU
# machine should measure, in order, within 9 minutes (the per-call limit is 10), each step under its own timeout.
#
#   here, once:      bash tests/bench/device_wheels.sh          # the missing packages as wheels, into .device/
#   device call:     run(command='bash tests/bench/device_check.sh "$OUT"', carry=[".device"], timeout_s=560)
#   CPU smoke run:   bash tests/bench/device_check.sh OUT_DIR --smoke   # tiny profile, 4 images, no CUDA
#
# Steps: install the carried wheels; 64 random-ish 1024x768 JPEGs; `item models pull` + `item scan` with
# small-random then paper-random on CUDA (shared model folder, untrained head); tests/bench/bench_gpu.py with
# what is left of the budget; the feed benchmark (tests/bench/bench_feed.py --mode embedded, SQLite ledger, no
# broker); a summary, printed last. Output is unbuffered and tee'd to OUT_DIR/log.txt; each step's outcome is
# appended to OUT_DIR/steps.jsonl as it ends and every step writes its results as it goes, so a step cut short
# (or the whole call) still returns what was measured. What lands in OUT_DIR (at most 8 files come back):
#   log.txt  steps.jsonl  scan-small-random.jsonl  scan-paper-random.jsonl  gpu/results.jsonl  gpu/gpu_bench.json
#   feed.json
# Models, images and installed wheels go to $DEVICE_CHECK_WORK (default /tmp/item-device-check), never OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

OUT_DIR=${OUT:-}
SMOKE=0
for arg in "$@"; do
  case $arg in
    --smoke) SMOKE=1 ;;
    -*) echo "unknown option: $arg" >&2; exit 2 ;;
    *) OUT_DIR=$arg ;;
  esac
done
if [ -z "$OUT_DIR" ]; then
  echo "usage: bash tests/bench/device_check.sh OUT_DIR [--smoke]   (OUT_DIR defaults to \$OUT)" >&2
  exit 2
fi
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)

PY=${PYTHON:-python3}
WORK=${DEVICE_CHECK_WORK:-/tmp/item-device-check}
export PYTHONUNBUFFERED=1
export XDG_CACHE_HOME=$WORK/cache  # the default model folder is then the shared one below, whoever asks
MODELS=$XDG_CACHE_HOME/item/models
export ITEM_MODEL_DIR=$MODELS      # and so is the settings' model folder (bench_feed, item scan)
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
IMAGES=$WORK/images
STEPS=$OUT_DIR/steps.jsonl
if [ "$SMOKE" = 1 ]; then
  TOTAL_S=${DEVICE_CHECK_S:-150} DEVICE=cpu COUNT=4 SCAN_PROFILES="tiny" FEED_PROFILE=tiny FEED_N=8 FEED_CAP=60
  GPU_ARGS=(--smoke --only ceilings,preprocess,detect,static_cache)
else
  TOTAL_S=${DEVICE_CHECK_S:-530} DEVICE=cuda COUNT=64 SCAN_PROFILES="small-random paper-random"
  FEED_PROFILE=paper-random FEED_N=256 FEED_CAP=200 GPU_ARGS=()
fi
START=$(date +%s)

left() { echo $((TOTAL_S - ($(date +%s) - START))); }
# Reserves below are written for the 530 s device budget; a shorter one (the smoke run's) shrinks them alike.
scaled() { echo $(($1 * TOTAL_S / 530)); }

# step NAME CAP_S RESERVE_S [-o FILE] -- COMMAND...: runs COMMAND under `timeout`, for at most CAP_S seconds and
# never into the RESERVE_S seconds kept for the steps after it; skipped when under 10 s would be left for it.
# Its outcome goes to steps.jsonl at once. With -o, the command's stdout goes to FILE (stderr to the log).
step() {
  local name=$1 cap=$2 reserve=$3 out="" limit began rc seconds outcome
  shift 3
  if [ "$1" = "-o" ]; then out=$2; shift 2; fi
  [ "$1" = "--" ] && shift
  limit=$(($(left) - $(scaled "$reserve")))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: skipped, $(left) s left of $TOTAL_S"
    printf '{"step": "%s", "outcome": "skipped", "left_s": %d}\n' "$name" "$(left)" >>"$STEPS"
    return 0
  fi
  echo "=== $name (limit ${limit} s, $(left) s left of $TOTAL_S) $(date -u +%H:%M:%S)"
  began=$(date +%s.%N)
  if [ -n "$out" ]; then
    timeout -k 10 "$limit" "$@" >"$out"
  else
    timeout -k 10 "$limit" "$@"
  fi
  rc=$?
  seconds=$(awk -v a="$began" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  case $rc in 0) outcome=ok ;; 124 | 137) outcome=timeout ;; *) outcome=failed ;; esac
  echo "=== $name: $outcome (rc $rc) in ${seconds} s"
  printf '{"step": "%s", "outcome": "%s", "rc": %d, "seconds": %s, "limit_s": %d}\n' \
    "$name" "$outcome" "$rc" "$seconds" "$limit" >>"$STEPS"
  return 0
}

main() {
  echo "=== device check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')," \
    "smoke $SMOKE, budget $TOTAL_S s, out $OUT_DIR"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  mkdir -p "$WORK" "$MODELS" "$OUT_DIR/gpu"
  : >"$STEPS"

  # The packages the machine lacks (tests/bench/device_wheels.sh); never installed by a smoke run.
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  if [ "$SMOKE" = 0 ]; then
    if compgen -G ".device/wheels/*.whl" >/dev/null; then
      step wheels 60 420 -- "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" .device/wheels/*.whl
      export PYTHONPATH=$WORK/site:$PYTHONPATH
    else
      echo "=== no .device/wheels: run tests/bench/device_wheels.sh where the registry is reachable, carry .device"
    fi
  fi
  "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__,
    "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'

  step images 60 400 -- "$PY" -c "
import sys
from pathlib import Path
from tests.bench.bench_gpu import _jpeg_bytes
folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
for index, data in enumerate(_jpeg_bytes(int(sys.argv[2]), seed=7)):
    (folder / f'{index:03d}.jpg').write_bytes(data)
print(len(list(folder.glob('*.jpg'))), 'JPEGs in', folder)
" "$IMAGES" "$COUNT"

  # (a) item scan on the device: each profile's models generated first (timed on their own), then scanned.
  for profile in $SCAN_PROFILES; do
    case $profile in
      paper-random) pull=(240 250) scan=(150 220) ;;
      *) pull=(90 380) scan=(90 350) ;;
    esac
    step "pull-$profile" "${pull[@]}" -- "$PY" -m worker.cli models pull --profile "$profile" --model-dir "$MODELS"
    step "scan-$profile" "${scan[@]}" -o "$OUT_DIR/scan-$profile.jsonl" -- "$PY" -m worker.cli scan "$IMAGES" \
      --profile "$profile" --head untrained --device "$DEVICE" --model-dir "$MODELS" --json
  done

  # (b) the GPU benchmark with what is left, minus the feed benchmark's share; a phase that would not fit skips.
  local feed_reserve=130 budget
  budget=$(($(left) - $(scaled "$feed_reserve") - 45))
  if [ "$budget" -ge 30 ]; then
    step bench_gpu $((budget + 45)) "$feed_reserve" -- "$PY" tests/bench/bench_gpu.py --budget-s "$budget" \
      --out "$OUT_DIR/gpu" --model-dir "$MODELS" --device "$DEVICE" "${GPU_ARGS[@]}"
  else
    step bench_gpu 0 0 -- true # recorded as skipped
  fi

  # (c) the feed benchmark, in-process (SQLite ledger, no broker); another engineer's script: tolerated if absent.
  if [ -f tests/bench/bench_feed.py ]; then
    step bench_feed "$FEED_CAP" 15 -o "$OUT_DIR/feed.json" -- "$PY" -m tests.bench.bench_feed --mode embedded \
      --profile "$FEED_PROFILE" --device "$DEVICE" --n "$FEED_N" --json
    head -c 2000 "$OUT_DIR/feed.json"
    echo
  else
    echo "=== bench_feed: tests/bench/bench_feed.py is not in this tree; skipped"
    printf '{"step": "bench_feed", "outcome": "absent"}\n' >>"$STEPS"
  fi

  timeout 30 "$PY" - "$OUT_DIR" "$SCAN_PROFILES" <<'EOF'
"""The summary, printed last: each step's outcome, the scans' per-stage times, bench_gpu's detect figures and goals."""
import json
import sys
from pathlib import Path

out, profiles = Path(sys.argv[1]), sys.argv[2].split()


def lines(path):
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]
    except (OSError, ValueError):
        return []


print("\n==================== summary")
for step in lines(out / "steps.jsonl"):
    extra = f"rc {step['rc']}, {step['seconds']} s of {step['limit_s']}" if "rc" in step else ""
    print(f"{step['step']:24s} {step['outcome']:8s} {extra}")
for profile in profiles:
    rows = lines(out / f"scan-{profile}.jsonl")
    good = [row for row in rows if not row.get("error")]
    stages = {}
    for row in good:
        for name, ms in (row.get("timings_ms") or {}).items():
            stages.setdefault(name, []).append(ms)
    mean = "  ".join(f"{name} {sum(v) / len(v):.1f}" for name, v in stages.items())
    print(f"scan {profile}: {len(good)} scored, {len(rows) - len(good)} errors; mean ms/img: {mean}")
    if good:
        precision = {k: v.split("precision=")[1].split(",")[0].split("|")[0] for k, v in
                     good[0]["pipeline_version"].items() if "precision=" in str(v)}
        print(f"  precisions {precision}")
summary = out / "gpu" / "gpu_bench.json"
if summary.exists():
    bench = json.loads(summary.read_text())
    print("bench_gpu on", bench["environment"].get("device"), "torch", bench["environment"].get("torch"))
    phases = bench["phases"]
else:
    print("bench_gpu: no gpu_bench.json (cut short?); phases from results.jsonl")
    phases, bench = {row.pop("phase"): row for row in lines(out / "gpu" / "results.jsonl")}, None
for name, record in phases.items():
    outcome = record.get("skipped") or record.get("error") or f"done in {record.get('seconds')} s"
    print(f"  {name:12s} {outcome[:150]}")
detect = phases.get("detect", {})
for key, value in detect.items():
    if key[:1] == "b" and isinstance(value, dict) and "img_s" in value:
        print(f"  detect {key}: {value['img_s']} img/s ({value['img_s_with_decode']} with decode);"
              f" ms/img {value['stage_ms_per_img']}")
static = phases.get("static_cache", {})
for key in ("first_full", "full", "partial", "partial_again"):
    if isinstance(static.get(key), dict) and "caption_batch_ms" in static[key]:
        print(f"  static cache {key} ({static[key]['images']}): caption {static[key]['caption_batch_ms']} ms")
if bench:
    for key, goal in bench["totals"].get("goals", {}).items():
        print(f"  goal {key}: {goal['measured']} vs {goal['goal']} {'met' if goal['met'] else 'NOT met'}")
    print("  (full/global-only totals include CPU preprocessing; served = Detector.detect with JPEG decode)")
feed = out / "feed.json"
if feed.exists() and feed.stat().st_size:
    print("bench_feed:", feed.read_text()[:600].strip())
EOF
  echo "=== device check done in $(($(date +%s) - START)) s"
}

main 2>&1 | tee -a "$OUT_DIR/log.txt"
exit "${PIPESTATUS[0]}"
