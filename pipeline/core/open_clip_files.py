"""The files of an open_clip model folder, as open_clip's `local-dir:` loader reads them: the weights in
`open_clip_model.safetensors` (never a pickle) and `open_clip_config.json` (architecture and preprocessing)."""

from __future__ import annotations

import json
from pathlib import Path


def save_open_clip_weights(model, directory: Path) -> None:
    """The weights file open_clip's `local-dir:` loader reads (safetensors, never a pickle)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, directory / "open_clip_model.safetensors")


def write_open_clip_config(folder: Path, architecture: str, pretrained_tag: str) -> None:
    """Gives an open_clip folder the `open_clip_config.json` its `local-dir:` loader needs, if it lacks one,
    from open_clip's built-in architecture config and the preprocessing of its pretrained tag."""
    target = folder / "open_clip_config.json"
    if target.is_file():
        return
    import open_clip

    model_cfg = open_clip.get_model_config(architecture)
    if model_cfg is None:
        raise ValueError(f"open_clip has no built-in architecture {architecture!r}.")
    tag_cfg = open_clip.get_pretrained_cfg(architecture, pretrained_tag)
    keys = ("mean", "std", "interpolation", "resize_mode")
    preprocess = {key: tag_cfg[key] for key in keys if key in tag_cfg}
    preprocess["image_size"] = model_cfg["vision_cfg"]["image_size"]
    target.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2) + "\n")
