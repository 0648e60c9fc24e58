"""The read functions' replies as a direct reader parses them (the ``direct`` extra)."""

from __future__ import annotations

import pytest

from prompt_migration_client.errors import NotFound
from prompt_migration_client.functions import (
    ACTIVE,
    NoActiveVersion,
    meta_key,
    parse_reply,
    values_prefix,
)


def test_a_read_reply_gives_each_users_value_or_none() -> None:
    assert parse_reply([3, b"m", b"2", b"\x00\x01", None, False]) == (
        "m",
        "2",
        [b"\x00\x01", None, None],
    )


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ([0], "No model is active yet"),
        ([2, b"m", b"9", b""], "has no prompt set version '9'"),
        ([2, b"m", b"9", b"writing"], "is not sealed yet"),
    ],
)
def test_a_refusal_is_not_found_with_what_to_do(reply: list[object], message: str) -> None:
    with pytest.raises(NotFound, match=message) as refused:
        parse_reply(reply)
    assert refused.value.status == 404


def test_a_model_without_an_active_version_is_named() -> None:
    with pytest.raises(NoActiveVersion, match="POST /models/m/train") as refused:
        parse_reply([1, b"m"])
    assert refused.value.model == "m"


def test_the_keys_share_the_sets_hash_tag() -> None:
    assert ACTIVE == "pm:{registry}:active"
    assert meta_key("m", "2") == "pm:{m:2}:meta"
    assert values_prefix("m", "2") == "pm:{m:2}:u:"
