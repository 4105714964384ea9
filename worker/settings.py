"""One typed settings object, read from `ITEM_`-prefixed environment variables (and a `.env` file).

With nothing set, everything runs embedded on this machine: models under the user cache, in-process
execution. Command-line options override these values for one run.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from pipeline.store import DEFAULT_MODEL_DIR


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ITEM_", env_nested_delimiter="__", env_file=".env", extra="ignore")

    profile: str = Field("paper", description="Model profile: paper, small or tiny.")
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="Where model folders live (and are downloaded to).")
    allow_download: bool = Field(True, description="Fetch missing models from the Hugging Face hub.")
    head: Path | None = Field(None, description="Head weights (.safetensors) used to score.")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N.")
    batch_size: int = Field(8, ge=1, le=512, description="Images per model batch.")
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, le=89_478_485, description="Largest image accepted, in pixels (Pillow caps it)."
    )
    max_image_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1, description="Largest image file accepted, in bytes.")
