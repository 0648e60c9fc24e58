"""Hugging Face PEFT prompt-tuning adapters, one per user, to and from set files.

PEFT's own on-disk format, one directory per user (named by the user id): ``adapter_config.json``
(``peft_type`` PROMPT_TUNING, ``task_type`` CAUSAL_LM, ``num_virtual_tokens`` l, ``token_dim`` d,
``num_transformer_submodules`` 1) and ``adapter_model.safetensors`` holding ``prompt_embeddings``
``[l, d]``.

What the vectors mean: PEFT concatenates them with the output of the model's input embedding
module, so they are model inputs (on Gemma, sqrt(d) times the raw table rows this service
stores); and PEFT's forward puts them first, before the whole input, while this service's
templates put the prompt after the item text. The same vectors at another place give other
predictions, so both directions refuse unless ``placement="template"`` says the vectors belong at
the template's place: adapters this module exported (they carry that stamp, and import without
it), or adapters trained with this service's template. An exported adapter reproduces the
service's predictions only when spliced by the client's builders, never through PEFT's forward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from prompt_migration_client.contract import INPUT, RAW
from prompt_migration_client.errors import ContractError
from prompt_migration_client.ids import USER_ID_RULE, is_user_id
from prompt_migration_client.setfile import open_setfile, write_setfile

CONFIG, WEIGHTS, KEY = "adapter_config.json", "adapter_model.safetensors", "prompt_embeddings"
PLACEMENT = "template"
_STAMP = "prompt_migration_placement"


def _read_one(folder: Path) -> tuple[np.ndarray, dict[str, Any], str | None]:
    """One adapter's ``[l, d]`` vectors, its config and its placement stamp."""
    try:
        config = json.loads((folder / CONFIG).read_text())
        with safe_open(str(folder / WEIGHTS), "np") as weights:
            vectors, stamp = weights.get_tensor(KEY), (weights.metadata() or {}).get(_STAMP)
    except (OSError, ValueError, KeyError) as error:
        raise ContractError(
            f"{folder} is not a PEFT prompt-tuning adapter ({error}): it needs {CONFIG} and "
            f"{WEIGHTS} with a {KEY!r} tensor, as PeftModel.save_pretrained writes them."
        ) from error
    wanted = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM"}
    wrong = {k: config.get(k) for k, v in wanted.items() if config.get(k) != v}
    if wrong or (config.get("num_transformer_submodules") or 1) != 1:
        raise ContractError(
            f"{folder}: {wrong or 'two transformer submodules'}; only causal-LM prompt tuning "
            f"({wanted}) has one vector per virtual token."
        )
    if vectors.shape != (config["num_virtual_tokens"], config["token_dim"]):
        raise ContractError(
            f"{folder}: {KEY} is {list(vectors.shape)}, its config says "
            f"[{config['num_virtual_tokens']}, {config['token_dim']}]."
        )
    return vectors.astype(np.float32), config, stamp


def adapters_to_setfile(root: Path, dest: Path, *, task: str, placement: str | None = None) -> Path:
    """Every adapter directory under ``root`` as one set file (model-input space, no head)."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ContractError(f"{root} holds no adapter directories (one per user, named by id).")
    rows, configs, stamps = zip(*(_read_one(folder) for folder in folders), strict=True)
    shapes = {row.shape for row in rows}
    if len(shapes) != 1:
        raise ContractError(f"The adapters under {root} have different shapes {sorted(shapes)}.")
    placements = {placement} if placement else set(stamps)
    metadata = {
        "task": task,
        "space": INPUT,
        "source_format": "peft",
        "peft_base_model": str(configs[0].get("base_model_name_or_path")),
    }
    if placements == {PLACEMENT}:
        metadata["placement"] = PLACEMENT
    users = [folder.name for folder in folders]
    return write_setfile(dest, prompts=np.stack(rows), users=users, metadata=metadata)


def _user_folder(out: Path, user: str) -> Path:
    """``out / user``, refused unless it is a folder directly under ``out``: a set file is input,
    and an id such as ``..``, ``../x`` or ``/x`` (or a link already there) would write elsewhere."""
    root = out.resolve()
    if not is_user_id(user) or user in (".", "..") or (root / user).resolve().parent != root:
        raise ContractError(
            f"User id {user[:40]!r} cannot name a folder under {out}: ids are {USER_ID_RULE}, "
            "and neither '.' nor '..'. Nothing was written."
        )
    return out / user


def setfile_to_adapters(source: Path, out: Path, *, placement: str | None = None) -> list[Path]:
    """One PEFT adapter directory per user of an exported set file, in PEFT's space."""
    if placement != PLACEMENT:
        raise ContractError(
            "PEFT's forward prepends prompt-tuning vectors to the whole input, but this set was "
            "made for a template that places them after the item text: PeftModel would predict "
            "differently. Pass placement='template' to export them for splicing at the "
            "template's place (prompt_migration_client.builders), not for PeftModel's forward."
        )
    setfile = open_setfile(source)
    bundle = setfile.bundle()
    if bundle is None or setfile.metadata.get("space") != RAW:
        raise ContractError(f"{source} is not a set exported by this service (no bundle).")
    length, width = bundle["prompt"]["shape"]
    scale = float(bundle["scale"]["input_scale"])
    present, prompts, written = setfile.present(), setfile.prompts, []
    # Every id is checked before anything is written.
    folders = {
        row: _user_folder(out, user) for row, user in enumerate(setfile.user_ids()) if present[row]
    }
    for row, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": length,
            "token_dim": width,
            "num_transformer_submodules": 1,
            "base_model_name_or_path": bundle["checkpoint"]["name"],
            "prompt_tuning_init": "RANDOM",
            "inference_mode": True,
        }
        (folder / CONFIG).write_text(json.dumps(config, indent=2))
        vectors = np.asarray(prompts[row], dtype=np.float32) * scale
        save_file(
            {KEY: vectors}, str(folder / WEIGHTS), metadata={"format": "pt", _STAMP: PLACEMENT}
        )
        written.append(folder)
    return written
