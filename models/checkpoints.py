"""Model names -> checkpoint directories.

Built-in names cover the two real models of the asset cache and two tiny random ones for tests;
anything else must be a directory holding a transformers checkpoint (config plus weights).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from models import assets
from models.errors import CheckpointError, UnknownModelError
from models.tiny import TINY_SPECS, build_tiny_checkpoint

REAL_MODELS = tuple(assets.MODEL_ASSETS)
TINY_MODELS = tuple(TINY_SPECS)
BUILTIN_MODELS = REAL_MODELS + TINY_MODELS
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _tiny_checkpoint(name: str) -> Path:
    out = assets.cache_dir() / "tiny" / name
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out.with_name(name + ".partial"), ignore_errors=True)
        build_tiny_checkpoint(name, out)
    return out


def check_checkpoint_dir(path: Path) -> Path:
    """Raise CheckpointError unless ``path`` holds a config and weights."""
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} has no config.json: point at a directory written by save_pretrained()."
        )
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise CheckpointError(
            f"{path} has a config but no weights ({' or '.join(_WEIGHT_FILES)}): copy the "
            "checkpoint's weight files into it."
        )
    return path


def resolve_checkpoint(name_or_path: str) -> Path:
    """Return the checkpoint directory for a built-in name or a local path."""
    if name_or_path in TINY_MODELS:
        return _tiny_checkpoint(name_or_path)
    if name_or_path in REAL_MODELS:
        path = assets.model_dir(name_or_path)
        if not (path / "config.json").exists():
            raise CheckpointError(
                f"Model {name_or_path!r} is not in the asset cache {path.parent}: run `make setup`."
            )
        return check_checkpoint_dir(path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return check_checkpoint_dir(path)
    raise UnknownModelError(
        f"Unknown model {name_or_path!r}: use one of {list(BUILTIN_MODELS)} or the path of a "
        "local checkpoint directory."
    )
