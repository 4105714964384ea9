"""One settings object per process: built at start-up from the environment and the command line, with one clear
error naming each bad variable, and the old name of the batch budget still read."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from worker.cli.main import app
from worker.settings import SettingsError, load_settings


def test_a_bad_value_is_one_clear_error_naming_its_variable(monkeypatch):
    monkeypatch.setenv("ITEM_BATCH_SIZE", "0")
    monkeypatch.setenv("ITEM_LEASE_S", "soon")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert refused.value.code == "settings.invalid"
    assert "ITEM_BATCH_SIZE=0" in refused.value.message and "ITEM_LEASE_S=soon" in refused.value.message


def test_options_override_the_environment_and_none_means_not_given(monkeypatch):
    monkeypatch.setenv("ITEM_BATCH_SIZE", "16")
    assert load_settings(batch_size=None).batch_size == 16
    assert load_settings(batch_size=4).batch_size == 4


def test_the_old_name_of_the_batch_budget_is_still_read(monkeypatch):
    monkeypatch.setenv("ITEM_CHECK_TIME_BUDGET_S", "120")
    assert load_settings().batch_time_budget_s == 120
    monkeypatch.setenv("ITEM_BATCH_TIME_BUDGET_S", "60")  # both, disagreeing: refused, not guessed
    with pytest.raises(SettingsError, match="set only ITEM_BATCH_TIME_BUDGET_S"):
        load_settings()


def test_a_command_with_a_bad_setting_exits_2_with_the_message(monkeypatch, tmp_path):
    monkeypatch.setenv("ITEM_DATABASE_URL", f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    monkeypatch.setenv("ITEM_RECONCILE_AFTER_S", "1")
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 2
    output = " ".join(result.output.split())  # the console wraps long lines
    assert "settings.invalid" in output and "reconcile_after_s must be longer than lease_s" in output


def test_stage_precision_is_read_as_json_and_checked(monkeypatch):
    monkeypatch.setenv("ITEM_STAGE_PRECISION", '{"ground": "bf16", "embed": "tf32"}')
    assert load_settings().stage_precision == {"ground": "bf16", "embed": "tf32"}
    monkeypatch.setenv("ITEM_STAGE_PRECISION", '{"ground": "int4"}')
    with pytest.raises(SettingsError, match="ground=int4"):
        load_settings()


def test_stored_artifacts_are_named_as_the_codec_names_them_and_checked(monkeypatch):
    from pipeline.core.codec import FIELDS
    from worker.settings import ARTIFACT_KINDS, DEFAULT_STORED_ARTIFACTS

    assert set(ARTIFACT_KINDS) == set(FIELDS)  # the settings cannot import the codec (no numpy on the client side)
    assert load_settings().store_artifacts == list(DEFAULT_STORED_ARTIFACTS)
    assert "embed" not in DEFAULT_STORED_ARTIFACTS  # the CLIP vectors are kept only when asked for
    monkeypatch.setenv("ITEM_STORE_ARTIFACTS", '["caption", "embed"]')
    assert load_settings().store_artifacts == ["caption", "embed"]
    monkeypatch.setenv("ITEM_STORE_ARTIFACTS", '["caption", "pixels"]')
    with pytest.raises(SettingsError, match="ITEM_STORE_ARTIFACTS=.*: pixels not among"):
        load_settings()


def test_a_provenance_policy_that_could_never_apply_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("ITEM_PROVENANCE_DECIDES", "trusted")  # no anchors: no manifest could ever be trusted
    with pytest.raises(SettingsError, match="needs c2pa_trust_anchors"):
        load_settings()
    monkeypatch.setenv("ITEM_PROVENANCE_DECIDES", "declared")
    monkeypatch.setenv("ITEM_READ_PROVENANCE", "false")
    with pytest.raises(SettingsError, match="needs read_provenance"):
        load_settings()


def test_unreadable_trust_anchors_are_one_clear_error(tmp_path):
    from pipeline.core.errors import ItemError
    from worker.sources.provenance import provenance_reader

    for anchors, why in ((tmp_path / "missing.pem", "cannot read"), (tmp_path / "empty.pem", "no PEM certificate")):
        if anchors.name == "empty.pem":
            anchors.write_text("not a certificate")
        with pytest.raises(ItemError, match=why) as refused:
            provenance_reader(load_settings(c2pa_trust_anchors=anchors))
        assert refused.value.code == "settings.invalid" and "ITEM_C2PA_TRUST_ANCHORS" in refused.value.message


def test_celery_on_a_bad_setting_says_which_in_one_line():
    import os
    import subprocess
    import sys
    from pathlib import Path

    celery = Path(sys.executable).parent / "celery"
    env = {**os.environ, "ITEM_BATCH_SIZE": "0", "ITEM_BROKER_URL": "redis://127.0.0.1:1/0"}
    result = subprocess.run([str(celery), "-A", "worker.intake.app", "inspect", "ping"], env=env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "error [settings.invalid] Invalid settings: ITEM_BATCH_SIZE=0: Input should be greater than or equal to 1"
    )
