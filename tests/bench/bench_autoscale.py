"""An autoscaler driven by `item backlog`, against real `item worker` processes started and stopped: 0 → N → 0.

A benchmark instrument, run on demand (never in the suite). On a Postgres database and a Redis key prefix of its
own: one intake-only worker (`item worker --concurrency 0`) is always on; GPU workers (`item worker --no-intake
--concurrency 1`, the `sim` profile's simulated device at `--rate` images a second) are started and stopped by an
autoscaler loop here, as KEDA or an HPA would: every `--poll` seconds it runs `item backlog --json --per-worker
B --max N` (a subprocess, as a scaler polls), starts workers up to the desired count at once, and stops those
beyond it only once the desired count stayed lower for `--cooldown` seconds (the highest desire of that window
counts, as an HPA's scale-down stabilization). Stopping is Kubernetes': SIGTERM to the worker's main process,
SIGKILL after `--grace`. At t≈2 s, with no GPU worker running, a platform's plain Celery client sends `--checks`
checks at once (each its own image); the run ends once every one is done and the fleet is back to 0.

Variants (`--variants`, each run in turn on the same stack, each its own burst):
- `newest`: desired = max(busy, ceil(claimable / B)) within --max, the busy workers counted by lease owner
  (host:pid, the pid mapped to its worker here: every worker shares this machine's name, so `item backlog`'s
  busy_workers, which counts hosts, is at most 1); the newest workers go first, as a ReplicaSet picks.
- `busy`: desired = ceil(claimable / B), at least 1 while anything runs (what `item backlog` answers when every
  lease owner has one host name), and the worker holding the most checks goes first: workers are stopped in the
  middle of the burst, to show that their drain gives their prefetched batch back.
- `kill` (a control, not run by default): as `busy`, but the worker's process group is SIGKILLed instead: its
  checks wait out their lease, which the lease-wait figures must show.

Lease waits, from the ledger: a trigger on this run's own `checks` table records every change of status or lease
token (only a claim writes a token). A claim of a row that was `running` (a takeover: `claims.claim` takes a
running check only once its lease expired) is a lease wait (`lease_waits`); `lease_wait_max_s` is the longest,
from its worker's SIGTERM/SIGKILL here (else from the lease's last renewal) to the takeover.
`max_expired_running_s`: the longest any check sat `running` under an expired lease (at its takeover or its
end, and sampled at every poll). Given back: running → queued with the attempt taken back (`claims.release`);
running → queued with the attempt kept and no error: a killed GPU process's checks, given back by its worker.
Cross-check: done checks with attempts > 1 (a given-back check keeps 1; only a takeover or a retry adds one).
Figures are seconds from the burst's first message: first worker ready, all checks done, fleet back at 0.

    python -m tests.bench.bench_autoscale [--max-workers 3] [--checks 600] [--json]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

AUDIT_SQL = """
CREATE TABLE bench_transitions (check_id text, at timestamptz, old_status text, new_status text, old_attempts int,
  new_attempts int, old_owner text, new_owner text, old_expires timestamptz, error_code text);
CREATE FUNCTION bench_transition() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  INSERT INTO bench_transitions VALUES (NEW.id, clock_timestamp(), OLD.status, NEW.status, OLD.attempts,
    NEW.attempts, OLD.lease_owner, NEW.lease_owner, OLD.lease_expires_at, NEW.error_code);
  RETURN NULL; END $$;
CREATE TRIGGER bench_transition AFTER UPDATE ON checks FOR EACH ROW
  WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.lease_token IS DISTINCT FROM NEW.lease_token)
  EXECUTE FUNCTION bench_transition();
"""
LIVE_OWNERS = sa.text(
    "SELECT lease_owner, count(*) FROM checks WHERE status = 'running' AND lease_expires_at >= clock_timestamp()"
    " GROUP BY lease_owner"
)
EXPIRED_NOW = sa.text(
    "SELECT count(*), extract(epoch FROM max(clock_timestamp() - lease_expires_at)) FROM checks"
    " WHERE status = 'running' AND lease_expires_at < clock_timestamp()"
)
STATUSES = sa.text("SELECT status, count(*), max(attempts) FROM checks WHERE external_id LIKE :prefix GROUP BY status")
DONE_AFTER = sa.text(
    "SELECT extract(epoch FROM max(finished_at) - :burst), count(*) FROM checks WHERE external_id LIKE :prefix"
)
DONE_RETRIED = sa.text(
    "SELECT count(*) FROM checks WHERE external_id LIKE :prefix AND status = 'done' AND attempts > 1"
)
MOVES = sa.text(
    "SELECT t.check_id, t.old_status, t.new_status, t.old_attempts, t.new_attempts, t.old_owner, t.error_code,"
    " extract(epoch FROM t.at - t.old_expires), extract(epoch FROM t.at) FROM bench_transitions t"
    " JOIN checks c ON c.id = t.check_id"
    " WHERE c.external_id LIKE :prefix"
)
TERMINAL = {"done", "rejected", "failed"}
BURST_AT = 2.0  # seconds into a variant's run


@dataclass
class Pod:
    """One `item worker` process: started, ready, stopped and exited at seconds into the run."""

    name: str
    process: subprocess.Popen
    log: Path
    started: float
    ready: float | None = None
    stopped: float | None = None
    exited: float | None = None
    exit_code: int | None = None
    gpu_pids: set[int] = field(default_factory=set)
    stopped_wall: float = 0.0  # time.time() at SIGTERM, to read the log's clock against

    def look(self, now: float) -> None:
        text = self.log.read_text(errors="replace")
        self.gpu_pids |= {int(pid) for pid in re.findall(r"GPU loop \d+ starting \(pid (\d+)\)", text)}
        if self.ready is None and "item worker ready." in text:
            self.ready = now

    @property
    def live(self) -> bool:  # counted as a replica: not asked to stop
        return self.stopped is None


class Run:
    """One variant: the autoscaler loop over a fleet of GPU workers, and what it saw."""

    def __init__(self, args, stack, variant: str, engine: sa.Engine):
        self.args, self.stack, self.variant, self.engine = args, stack, variant, engine
        self.t0 = time.monotonic()
        self.pods: list[Pod] = []
        self.events: list[dict] = []
        self.polls: list[dict] = []
        self.desires: deque[tuple[float, int]] = deque()
        self.sent_at: float | None = None
        self.burst_wall: datetime.datetime | None = None
        self.max_expired_running_s = 0.0
        self.backlog_s: list[float] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    def note(self, what: str, **details) -> None:
        self.events.append({"t": round(self.now(), 2), "event": what, **details})

    # ------------------------------------------------------------------ the fleet

    def start_pod(self) -> None:
        name = f"{self.variant}-w{len(self.pods) + 1}"
        log = self.stack.folder / f"{name}.log"
        process = _worker(self.stack.env, log, "--concurrency", "1", "--no-intake")
        self.pods.append(Pod(name, process, log, self.now()))
        self.note("start", worker=name)

    def stop_pod(self, pod: Pod, held: int) -> None:
        pod.stopped, pod.stopped_wall = self.now(), time.time()
        signalled = "sigkill" if self.variant == "kill" else "sigterm"
        self.note(signalled, worker=pod.name, held_checks=held, ready=pod.ready is not None)
        with contextlib.suppress(ProcessLookupError):
            if self.variant == "kill":  # the control: the whole worker dies at once, as on a node's loss
                os.killpg(pod.process.pid, signal.SIGKILL)
            else:
                os.kill(pod.process.pid, signal.SIGTERM)  # the main process only, as Kubernetes does
        threading.Thread(target=self._await_exit, args=(pod,), daemon=True).start()

    def _await_exit(self, pod: Pod) -> None:
        try:
            pod.exit_code = pod.process.wait(self.args.grace)
        except subprocess.TimeoutExpired:
            self.note("sigkill", worker=pod.name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pod.process.pid, signal.SIGKILL)
            pod.exit_code = pod.process.wait()
        pod.exited = self.now()
        self.note("exited", worker=pod.name, exit_code=pod.exit_code, drain_s=round(pod.exited - pod.stopped, 2))

    def alive(self) -> list[Pod]:
        return [pod for pod in self.pods if pod.exited is None]

    # ------------------------------------------------------------------ the loop

    def backlog(self) -> dict:
        args = self.args
        started = time.monotonic()
        command = [str(_item()), "backlog", "--json", "--per-worker", str(args.per_worker),
                   "--max", str(args.max_workers)]  # fmt: skip
        result = subprocess.run(command, env=self.stack.env, capture_output=True, text=True, timeout=60)
        self.backlog_s.append(time.monotonic() - started)
        if result.returncode:
            raise SystemExit(f"item backlog failed: {result.stderr[-2000:]}")
        return json.loads(result.stdout)

    def held_by_pod(self) -> dict[str, int]:
        """Checks under a live lease, by the worker whose GPU loop (pid) holds them."""
        with self.engine.connect() as connection:
            owners = connection.execute(LIVE_OWNERS).all()
            _, oldest = connection.execute(EXPIRED_NOW).one()
        self.max_expired_running_s = max(self.max_expired_running_s, float(oldest or 0))
        by_pid = {pid: pod.name for pod in self.pods for pid in pod.gpu_pids}
        held: dict[str, int] = {}
        for owner, n in owners:
            name = by_pid.get(int(owner.rsplit(":", 1)[1]), f"other:{owner}")
            held[name] = held.get(name, 0) + n
        return held

    def desired(self, report: dict, held: dict[str, int]) -> int:
        cap, by_load = self.args.max_workers, math.ceil(report["claimable"] / self.args.per_worker)
        if self.variant in ("busy", "kill"):
            return min(cap, max(by_load, 1 if report["running"] else 0))
        return max(report["desired_workers"], min(cap, len(held)))

    def watch(self, done: threading.Event) -> None:
        """Reads the workers' logs every 0.2 s: when each got ready, its GPU loop's pid (a poll takes seconds)."""
        while not done.wait(0.2):
            for pod in list(self.pods):
                if pod.exited is None:
                    was_ready = pod.ready is not None
                    pod.look(self.now())  # a GPU loop replaced after a crash has a new pid
                    if pod.ready is not None and not was_ready:
                        self.note("ready", worker=pod.name, after_s=round(pod.ready - pod.started, 2))

    def step(self) -> None:
        report = self.backlog()
        held = self.held_by_pod()
        desired, now = self.desired(report, held), self.now()
        self.desires.append((now, desired))
        while self.desires[0][0] < now - self.args.cooldown:
            self.desires.popleft()
        live = [pod for pod in self.pods if pod.live]
        self.polls.append({"t": round(now, 2), "claimable": report["claimable"], "running": report["running"],
                           "backlog_busy": report["busy_workers"], "backlog_desired": report["desired_workers"],
                           "busy": len(held), "desired": desired, "replicas": len(live)})  # fmt: skip
        if desired > len(live):
            self.note("scale_up", replicas=f"{len(live)}->{desired}")
            for _ in range(desired - len(live)):
                self.start_pod()
            return
        target = max(d for _, d in self.desires)  # the highest desire of the cooldown window
        if target < len(live):
            self.note("scale_down", replicas=f"{len(live)}->{target}")
            if self.variant in ("busy", "kill"):
                victims = sorted(live, key=lambda pod: (held.get(pod.name, 0), pod.started), reverse=True)
            else:
                victims = sorted(live, key=lambda pod: pod.started, reverse=True)
            for pod in victims[: len(live) - target]:
                self.stop_pod(pod, held.get(pod.name, 0))

    def finished(self, prefix: str) -> dict | None:
        with self.engine.connect() as connection:
            counts = {status: n for status, n, _ in connection.execute(STATUSES, {"prefix": prefix + "%"})}
        ended = sum(n for status, n in counts.items() if status in TERMINAL)
        if self.sent_at is not None and ended >= self.args.checks and not self.alive():
            return counts
        return None

    def drive(self, send) -> dict:
        prefix = f"{self.variant}-"
        sender = threading.Thread(target=self._send_at, args=(send, prefix), daemon=True)
        sender.start()
        watching = threading.Event()
        threading.Thread(target=self.watch, args=(watching,), daemon=True).start()
        deadline = self.t0 + self.args.timeout
        try:
            while (counts := self.finished(prefix)) is None:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{self.variant}: not finished in {self.args.timeout}s: {self.polls[-1:]}")
                started = time.monotonic()
                self.step()
                time.sleep(max(0.0, self.args.poll - (time.monotonic() - started)))
        finally:
            watching.set()
            for pod in self.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pod.process.pid, signal.SIGKILL)
        all_done = self.now()
        return self.report(prefix, counts, all_done)

    def _send_at(self, send, prefix: str) -> None:
        time.sleep(max(0.0, BURST_AT - self.now()))
        self.burst_wall = datetime.datetime.now(datetime.UTC)
        self.note("burst", checks=self.args.checks)
        send(prefix)
        self.sent_at = self.now()
        self.note("burst_sent", seconds=round(self.sent_at - BURST_AT, 2))

    # ------------------------------------------------------------------ what the ledger says

    def report(self, prefix: str, counts: dict, fleet_zero_at: float) -> dict:
        where = {"prefix": prefix + "%", "burst": self.burst_wall}
        with self.engine.connect() as connection:
            times = connection.execute(DONE_AFTER, where).one()
            retried_done = connection.scalar(DONE_RETRIED, where)
            moves = connection.execute(MOVES, where).all()
        takeovers = [m for m in moves if m[1] == "running" and m[2] == "running"]
        late = [m for m in moves if m[1] == "running" and m[7] is not None and m[7] > 0]
        requeued = [m for m in moves if m[1] == "running" and m[2] == "queued"]
        given_back = [m for m in requeued if m[4] < m[3]]  # claims.release: the attempt taken back
        retries = [m for m in requeued if m[4] >= m[3] and m[6] is not None]  # a transient error, recorded
        taken_back = [m for m in requeued if m[4] >= m[3] and m[6] is None]  # a killed process's, by its worker
        by_pid = {pid: pod for pod in self.pods for pid in pod.gpu_pids}
        back_by: dict[str, int] = {}
        for m in given_back:
            name = by_pid[pid].name if (pid := int(m[5].rsplit(":", 1)[1])) in by_pid else m[5]
            back_by[name] = back_by.get(name, 0) + 1
        waits = []  # a takeover's wait: since its worker was stopped, else since its lease was last renewed
        for m in takeovers:
            pod = by_pid.get(int(m[5].rsplit(":", 1)[1]))
            since = pod.stopped_wall if pod is not None and pod.stopped is not None else None
            waits.append(float(m[8]) - since if since else float(m[7]) + self.args.lease)
        burst_t = BURST_AT
        first_ready = min((p.ready for p in self.pods if p.ready is not None), default=None)
        return {
            "variant": self.variant,
            "checks": self.args.checks,
            "statuses": counts,
            "first_worker_ready_s": _r(first_ready - burst_t if first_ready is not None else None),
            "worker_start_s": [_r(p.ready - p.started) for p in self.pods if p.ready is not None],
            "filed": times[1],
            "all_done_s": _r(times[0]),  # from the burst's first message to the last check done
            "fleet_zero_s": _r(fleet_zero_at - burst_t),
            "peak_workers": max((p["replicas"] for p in self.polls), default=0),
            "stopped": [_stopped(p, back_by.get(p.name, 0)) for p in self.pods if p.stopped is not None],
            "given_back": len(given_back),
            "retries": len(retries),
            "given_back_after_kill": len(taken_back),
            "lease_waits": len({m[0] for m in takeovers}),  # checks; a check taken over twice counts once
            "takeovers": len(takeovers),
            "lease_wait_max_s": _r(max(waits, default=0.0)),
            "finished_under_expired_lease": len(late) - len([m for m in late if m in takeovers]),
            "max_expired_running_s": _r(max([self.max_expired_running_s, *(m[7] for m in late)])),
            "done_attempts_gt_1": retried_done,
            "backlog_call_s": _r(sum(self.backlog_s) / max(1, len(self.backlog_s))),
            "events": sorted(self.events, key=lambda event: event["t"]),
            "polls": self.polls,
        }


def _stopped(pod: Pod, given_back: int) -> dict:
    """A stopped worker: its exit, drain seconds, checks given back, and from its log, seconds from SIGTERM to
    the worker starting its shutdown (`shutdown_s`), to its GPU loop saying it stopped (`loop_stopped_s`)."""
    drain = pod.exited - pod.stopped if pod.exited is not None else None
    found = {"worker": pod.name, "exit_code": pod.exit_code, "drain_s": _r(drain), "given_back": given_back}
    for line in pod.log.read_text(errors="replace").splitlines():
        stamp = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): [^]]+\] (.*)", line)
        if not stamp:
            continue
        at = datetime.datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - pod.stopped_wall
        for key, words in (("shutdown_s", "stopping intake"), ("loop_stopped_s", "stopped")):
            if at > -0.5 and key not in found and stamp[2].startswith(words):
                found[key] = _r(at)
        gave = re.match(r"gave back (\d+) prefetched", stamp[2])
        if gave:
            found["logged_given_back"] = found.get("logged_given_back", 0) + int(gave[1])
    return found


def _worker(env: dict, log: Path, *options: str) -> subprocess.Popen:
    """`item worker` in a process group of its own, its output into `log`."""
    command = [str(_item()), "worker", *options, "--loglevel", "INFO"]
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _r(value):
    return None if value is None else round(float(value), 2)


def _item() -> Path:
    return Path(sys.executable).parent / "item"


def burst(stack, args, first_seed: int):
    """`send(prefix)`: the burst, sent as a platform's Celery client does, its images (each its own bytes, so no
    answer is reused) made beforehand."""
    from tests.bench.bench_feed import jpeg
    from tests.integration.stack import platform_client

    client = platform_client(stack.env["ITEM_BROKER_URL"], stack.prefix)
    size = (args.size, args.size * 3 // 4)
    bodies = [base64.b64encode(jpeg(first_seed + i, size)).decode() for i in range(args.checks)]

    def send(prefix: str) -> None:
        for i, body in enumerate(bodies):
            client.send_task("item.check", kwargs={"external_id": f"{prefix}{i}", "image": {"b64": body}},
                             queue="item.checks")  # fmt: skip

    return send


def run(args, scratch: Path) -> dict:
    from pipeline.core.model_store import ModelStore
    from tests.bench.bench_feed import device_ms_for
    from tests.integration.conftest import temporary_postgres_database
    from tests.integration.stack import make_stack

    store = ModelStore(args.model_dir or scratch / "models", allow_download=False)
    results: dict = {"variants": {}}
    with temporary_postgres_database() as url, contextlib.ExitStack() as exits:
        stack = exits.enter_context(
            contextlib.contextmanager(make_stack)(
                url, store, scratch,
                ITEM_PROFILE="sim", ITEM_HEAD="untrained", ITEM_DEVICE="cpu", ITEM_LOG_FORMAT="text",
                ITEM_SIMULATED_DEVICE_MS=json.dumps(device_ms_for(args.rate)), ITEM_PREPARE_AHEAD="true",
                ITEM_BATCH_SIZE=str(args.batch_size), ITEM_BATCH_MAX_WAIT_S="0.05", ITEM_IDLE_POLL_S="0.5",
                ITEM_BATCH_TIME_BUDGET_S="60", ITEM_LEASE_S=str(args.lease), ITEM_RECONCILE_AFTER_S="300",
                ITEM_MAX_B64_BYTES=str(4 * 1024 * 1024),
            )
        )  # fmt: skip
        engine = sa.create_engine(url)
        exits.callback(engine.dispose)
        with engine.begin() as connection:
            connection.exec_driver_sql(AUDIT_SQL)
        intake_log = scratch / "intake.log"
        intake = _worker(stack.env, intake_log, "--concurrency", "0")
        exits.callback(_end, intake)
        deadline = time.monotonic() + 120
        while "item worker ready." not in intake_log.read_text(errors="replace"):
            if intake.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the intake worker never got ready:\n{intake_log.read_text()[-3000:]}")
            time.sleep(0.2)
        for index, variant in enumerate(args.variants.split(",")):
            send = burst(stack, args, index * args.checks)
            results["variants"][variant] = Run(args, stack, variant, engine).drive(send)
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                for log in scratch.glob("*.log"):
                    (args.logs / log.name).write_bytes(log.read_bytes())
    return results


def _end(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def print_text(result: dict) -> None:
    print(f"{result['date']}  {result['command']}  load {result['load_before']} → {result['load_after']}")
    rows = (
        "first_worker_ready_s", "worker_start_s", "all_done_s", "fleet_zero_s", "peak_workers", "given_back",
        "given_back_after_kill", "retries", "lease_waits", "takeovers", "lease_wait_max_s",
        "finished_under_expired_lease", "max_expired_running_s", "done_attempts_gt_1", "backlog_call_s", "filed",
        "statuses",
    )  # fmt: skip
    variants = result["variants"]
    print(f"{'':>30}" + "".join(f"{name:>22}" for name in variants))
    for row in rows:
        print(f"{row:>30}" + "".join(f"{json.dumps(v[row]):>22}" for v in variants.values()))
    for name, v in variants.items():
        print(f"\n{name}: stopped workers")
        for s in v["stopped"]:
            phases = f"(shutdown began {s['shutdown_s']}s, GPU loop stopped {s.get('loop_stopped_s')}s)" \
                if "shutdown_s" in s else ""  # fmt: skip
            print(f"  {s['worker']:>12}  exit {s['exit_code']}  drain {s['drain_s']}s {phases}  gave back "
                  f"{s['given_back']} (its log: {s.get('logged_given_back', 0)})")  # fmt: skip
        print(f"{name}: events (s from the start; the burst at ≈2 s)")
        for e in v["events"]:
            details = ", ".join(f"{k}={val}" for k, val in e.items() if k not in ("t", "event"))
            print(f"  {e['t']:7.2f}  {e['event']:<10} {details}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-workers", type=int, default=3, help="The fleet's maximum, `--max` (default 3).")
    parser.add_argument("--checks", type=int, default=600, help="Checks in the burst (default 600).")
    parser.add_argument("--variants", default="newest,busy", help="newest, busy, kill (default newest,busy).")
    parser.add_argument("--per-worker", type=int, default=200, help="`item backlog --per-worker` (default 200).")
    parser.add_argument("--batch-size", type=int, default=8, help="ITEM_BATCH_SIZE (default 8).")
    parser.add_argument("--rate", type=float, default=10.0, help="Simulated img/s of a GPU loop (default 10).")
    parser.add_argument("--size", type=int, default=128, help="Width of the JPEGs sent (default 128, 4:3).")
    parser.add_argument("--lease", type=float, default=6.0, help="ITEM_LEASE_S (default 6).")
    parser.add_argument("--poll", type=float, default=1.5, help="Seconds between backlog polls (default 1.5).")
    parser.add_argument("--cooldown", type=float, default=5.0, help="Scale-down stabilization (default 5 s).")
    parser.add_argument("--grace", type=float, default=90.0, help="SIGKILL this long after SIGTERM (default 90).")
    parser.add_argument("--timeout", type=float, default=300.0, help="Give up on a variant after this long.")
    parser.add_argument("--model-dir", type=Path, help="Keep generated models here (default: a temporary folder).")
    parser.add_argument("--logs", type=Path, help="Copy the workers' logs into this folder.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    header = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "tests.bench.bench_autoscale", *sys.argv[1:]]),
        "load_before": round(os.getloadavg()[0], 2),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "model_dir", "logs")},
    }
    with tempfile.TemporaryDirectory() as scratch:
        result = {**header, **run(args, Path(scratch)), "load_after": round(os.getloadavg()[0], 2)}
    ok = all(
        v["lease_waits"] == 0 and set(v["statuses"]) == {"done"} and not v["statuses"].get("running")
        for v in result["variants"].values()
    )  # fmt: skip
    result["ok"] = ok
    print(json.dumps(result, default=str)) if args.json else print_text(result)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
