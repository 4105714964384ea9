"""The client side starts in a blink: submitting, reading results and verifying callbacks load no model library;
nor does an intake-only Celery worker, whose task only files rows."""

from __future__ import annotations

import json
import subprocess
import sys

CLIENT_MODULES = (
    "worker.intake.client",
    "worker.outbox.signing",
    "worker.cli.main",
    "worker.ledger.store",
    "worker.ledger.views",
    "worker.ledger.outbox",
    "worker.rescore",
    "worker.intake.filing",
)
HEAVY = ("torch", "numpy", "open_clip", "transformers", "PIL", "sklearn", "scipy", "matplotlib")


def test_importing_the_client_modules_loads_no_model_library():
    # A fresh interpreter: this one has imported torch already.
    code = (
        "import importlib, json, sys\n"
        f"for name in {CLIENT_MODULES!r}: importlib.import_module(name)\n"
        f"print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []


def test_the_celery_app_and_its_intake_task_load_no_model_library():
    code = (
        "import json, sys\n"
        "from worker.settings import Settings\n"
        "from worker.intake.app import create_app\n"
        "app = create_app(Settings(broker_url='redis://127.0.0.1:6379/0'))\n"
        "task = app.tasks['item.check']\n"
        "import worker.intake.task, worker.intake.consumer, worker.intake.filing, worker.ops.step\n"
        f"print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []


def test_the_signing_module_needs_only_the_standard_library():
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import worker.outbox.signing\n"
        "new = {name.split('.')[0] for name in set(sys.modules) - before}\n"
        "print(json.dumps(sorted(new - set(sys.stdlib_module_names) - {'worker'})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []
