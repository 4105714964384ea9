"""Where model files live: a local model directory, filled from the Hugging Face hub or by a generator
(tiny.py's miniatures, full_size.py's random models at the published sizes).

Every stage loads from a local folder, so one code path serves a downloaded checkpoint, a copied one and
a generated tiny one. Each folder carries `item_model.json`, recording the revision it holds: that
revision, not the one asked for, goes into the stage version, so two hosts with different snapshots of
"main" never share artifacts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.defaults import DEFAULT_MODEL_DIR
from pipeline.core.errors import ModelUnavailableError
from pipeline.core.open_clip_files import write_open_clip_config
from pipeline.core.profiles import ModelSpec

# What to fetch from the hub: open_clip's own files from CLIP repos (timm's repos also hold a timm-only
# image tower), and no pickled weights from transformers repos, which all publish safetensors.
OPEN_CLIP_FILES = ["open_clip_*", "*.json", "*.txt"]
PICKLED_FILES = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.msgpack", "*.h5"]
MANIFEST = "item_model.json"  # in every model folder: what it holds, and at which revision


@dataclass(frozen=True)
class LocatedModel:
    spec: ModelSpec
    path: Path
    revision: str


class ModelStore:
    def __init__(self, model_dir: Path | str = DEFAULT_MODEL_DIR, *, allow_download: bool = True):
        self.model_dir = Path(model_dir).expanduser()
        # HF_HUB_OFFLINE is the hub library's own switch; honour it so one variable turns every download off.
        self.allow_download = allow_download and os.environ.get("HF_HUB_OFFLINE", "0") in ("", "0")

    def folder(self, spec: ModelSpec) -> Path:
        return self.model_dir / spec.name

    def is_present(self, spec: ModelSpec) -> bool:
        return not spec.weights or (self.folder(spec) / MANIFEST).is_file()

    def locate(self, spec: ModelSpec) -> LocatedModel:
        """The local folder of `spec`, generating or downloading it first when allowed."""
        if not spec.weights:
            return LocatedModel(spec, self.folder(spec), "builtin")
        if not self.is_present(spec):
            if spec.generated:
                self.generate(spec)
            elif self.allow_download:
                self.pull(spec)
            else:
                raise self._missing(spec)
        manifest = json.loads((self.folder(spec) / MANIFEST).read_text())
        return LocatedModel(spec, self.folder(spec), _revision(spec, manifest))

    def generate(self, spec: ModelSpec) -> Path:
        """Builds a generated model into its folder, with a manifest naming the generator and seed.

        Written to a private staging folder and renamed into place, so a half-built model never loads and two
        processes generating at once both end up with one complete folder.
        """
        generator = _generator(spec)
        folder = self.folder(spec)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            generator.build(spec.name, staging, spec.seed)
            manifest = {
                "name": spec.name,
                "generator": generator.GENERATOR,
                "generator_version": generator.GENERATOR_VERSION,
                "seed": spec.seed,
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            staging.rename(folder)
        except OSError:
            if not (folder / MANIFEST).is_file():  # another process won the rename: its folder is complete
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    def pull(self, spec: ModelSpec) -> Path:
        """Downloads `spec` into the model directory, pinned to the commit the hub resolves now."""
        if not spec.weights:
            return self.folder(spec)
        if spec.generated:
            return self.generate(spec)
        from huggingface_hub import HfApi, snapshot_download

        folder = self.folder(spec)
        try:
            commit = HfApi().model_info(spec.repo_id, revision=spec.revision).sha
            files = {"allow_patterns": OPEN_CLIP_FILES} if spec.open_clip else {"ignore_patterns": PICKLED_FILES}
            snapshot_download(spec.repo_id, revision=commit, local_dir=folder, **files)
        except Exception as error:
            raise self._missing(spec, reason=f"download failed: {error}") from error
        if spec.open_clip:
            write_open_clip_config(folder, *spec.open_clip)
        manifest = {"name": spec.name, "repo_id": spec.repo_id, "revision": commit}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return folder

    def _missing(self, spec: ModelSpec, reason: str = "downloads are off") -> ModelUnavailableError:
        folder = self.folder(spec)
        return ModelUnavailableError(
            f"Model {spec.name!r} ({spec.source}) is not in {folder.parent} and {reason}. Get it with "
            f"`item models pull --profile PROFILE --model-dir {folder.parent}` where the hub is reachable, or download "
            f"{spec.repo_id} into {folder} and write {MANIFEST} there (see README, 'Models').",
            code="model.missing",
        )


def _generator(spec: ModelSpec):
    """The module that builds `spec`: tiny miniatures or full-size random models (both import torch and
    transformers, so only when a model must be built)."""
    from pipeline.core import full_size, tiny

    return full_size if spec.name in full_size.BUILDERS or spec.name in full_size.SIMULATED_BUILDERS else tiny


def _revision(spec: ModelSpec, manifest: dict) -> str:
    if spec.generated:
        return f"seed{manifest['seed']}.g{manifest['generator_version']}"
    return str(manifest.get("revision") or spec.revision)[:12]
