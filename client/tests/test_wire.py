"""The wire formats on their own: prompt values, digests, set files and batch answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prompt_migration_client import codec, setfile
from prompt_migration_client.batch import (
    batch_json,
    batch_safetensors,
    found_values,
    parse_json,
    parse_safetensors,
)
from prompt_migration_client.errors import FormatError


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_values_round_trip_as_little_endian_bytes(dtype: str) -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    data = codec.encode(values, dtype)
    assert len(data) == 6 * np.dtype(codec.DTYPES[dtype]).itemsize
    assert np.array_equal(codec.decode(data, dtype=dtype, shape=(2, 3)), values)
    assert codec.decode(data, dtype=dtype, shape=(2, 3)).dtype == np.float32


def test_an_unknown_dtype_is_a_format_error_the_service_answers_422() -> None:
    with pytest.raises(FormatError, match="Unknown dtype 'int8'") as refused:
        codec.encode(np.zeros(2), "int8")
    assert (refused.value.status, refused.value.code) == (422, "invalid_input")


def test_set_digest_ignores_order_and_takes_users_out() -> None:
    items = [(f"u{i}", bytes([i]) * 8) for i in range(5)]
    whole = codec.set_digest(items)
    assert codec.set_digest(reversed(items)) == whole
    halves = [codec.set_digest(items[:2]), codec.set_digest(items[2:])]
    assert codec.combine_digests(halves) == whole
    assert codec.digest_without(whole, items[3:]) == codec.set_digest(items[:3])


def test_uploaded_prompts_are_checked_against_shape_and_range() -> None:
    with pytest.raises(FormatError, match="shape"):
        codec.check_prompt(np.zeros((2, 3)), shape=(1, 3))
    with pytest.raises(FormatError, match="NaN or Inf"):
        codec.check_prompt(np.full((1, 3), np.nan), shape=(1, 3))
    with pytest.raises(FormatError, match="float16 range"):
        codec.check_prompt(np.full((1, 3), 1e6), shape=(1, 3), dtype="float16")


def test_a_set_file_round_trips(tmp_path: Path) -> None:
    prompts = np.random.default_rng(0).normal(size=(3, 2, 4)).astype(np.float16)
    head = {"scale": np.ones((), np.float32), "bias": np.zeros((), np.float32)}
    path = setfile.write_setfile(
        tmp_path / "set.safetensors",
        prompts=prompts,
        users=["a", "bb", "c:1"],
        metadata={"task": "binary", "space": "raw_embedding_table"},
        head=head,
    )
    opened = setfile.open_setfile(path)
    assert opened.user_ids() == ["a", "bb", "c:1"] and opened.dtype == "float16"
    assert np.array_equal(np.asarray(opened.prompts), prompts)
    assert opened.present().all() and set(opened.head()) == {"scale", "bias"}
    assert opened.metadata["format"] == setfile.FORMAT and opened.bundle() is None
    assert b"".join(setfile.chunks(path, size=7)) == path.read_bytes()
    # Blocks of rows are read, not mapped, and clipped to the tensor.
    assert np.array_equal(opened.rows("prompts", 1, 10), prompts[1:])
    assert opened.rows("prompts", 3, 5).shape == (0, 2, 4)
    assert opened.user_ids(1, 2) == ["bb"]


def test_a_file_that_is_not_a_set_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10).to_bytes(8, "little") + b"not json!!")
    with pytest.raises(FormatError, match="Not a prompt set file: its header is not JSON"):
        setfile.open_setfile(bad)
    header = json.dumps({"prompts": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 4]}})
    bad.write_bytes(len(header).to_bytes(8, "little") + header.encode() + b"\0" * 4)
    with pytest.raises(FormatError, match="does not fill its byte range"):
        setfile.open_setfile(bad)


class _Set:
    model, version, shape, dtype = "m", "3", [2, 4], "float32"


def test_batch_answers_parse_back_in_both_encodings() -> None:
    rng = np.random.default_rng(1)
    values = {u: rng.normal(size=(2, 4)).astype(np.float32) for u in ("u1", "u3")}
    raw = [codec.encode(values["u1"], "float32"), None, codec.encode(values["u3"], "float32")]
    users = ["u1", "ghost", "u3"]
    found = found_values(users, raw)
    assert list(found) == ["u1", "u3"]
    as_json = parse_json(json.loads(batch_json(_Set(), users, found)))
    as_tensors = parse_safetensors(batch_safetensors(_Set(), users, found))
    for batch in (as_json, as_tensors):
        assert (batch.model, batch.version, batch.missing) == ("m", "3", ["ghost"])
        assert list(batch.prompts) == ["u1", "u3"]
        for user, want in values.items():
            assert np.array_equal(batch.prompts[user], want)


def test_an_empty_batch_answer_is_valid_json() -> None:
    body = json.loads(batch_json(_Set(), ["a"], {}))
    assert body["prompts"] == {} and body["missing"] == ["a"]
    assert parse_safetensors(batch_safetensors(_Set(), ["a"], {})).prompts == {}
