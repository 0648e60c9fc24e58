"""The store at scale: sealing costs the ids, not the prompts, and still catches a lost write;
deleting a version goes in bounded, non-blocking increments."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from prompt_migration_client import codec
from redis import Redis

from app.errors import IntegrityError
from app.store import SetMeta, Store
from app.store.bulk import BULK_KEYS, values_match
from tests.conftest import STORE_DB, RedisServer

USERS, WIDTH = 3000, 576  # a value of 2,304 bytes, as SmolLM2-135M's [1, 576] fp32 prompt


@pytest.fixture
def plain(redis_server: RedisServer) -> Iterator[Store]:
    """A store on the plain test Redis (INFO and SLOWLOG describe one server)."""
    client = Redis.from_url(redis_server.url(STORE_DB))
    client.flushdb()
    yield Store(client)
    client.close()


def _written(
    store: Store, model: str, *, users: int = USERS
) -> tuple[str, list[tuple[str, bytes]]]:
    version = store.allocate_version(model)
    rng = np.random.default_rng(0)
    items = [
        (f"u{i:05d}", codec.encode(rng.normal(size=(1, WIDTH)), "float32")) for i in range(users)
    ]
    store.begin_set(SetMeta(model=model, version=version, task="rating", shape=[1, WIDTH]))
    store.write_prompts(model, version, items)
    return version, items


def _bytes_sent(store: Store) -> int:
    return int(store.redis.info("stats")["total_net_output_bytes"])


def test_sealing_reads_no_value_back_yet_refuses_a_set_missing_a_value(plain: Store) -> None:
    version, items = _written(plain, "m-s")
    before = _bytes_sent(plain)
    meta = plain.seal_set(
        "m-s", version, expected_count=len(items), expected_digest=codec.set_digest(items)
    )
    sent = _bytes_sent(plain) - before
    assert (meta.state, meta.count, meta.digest) == ("sealed", USERS, codec.set_digest(items))
    values = sum(len(v) for _, v in items)
    assert sent < values / 20, f"sealing read {sent} bytes for {values} bytes of prompts"

    lost, items = _written(plain, "m-s")
    plain.redis.delete(f"pm:{{m-s:{lost}}}:u:{items[1234][0]}")  # one chunk lost a value
    with pytest.raises(IntegrityError, match="2999 stored"):
        plain.seal_set(
            "m-s", lost, expected_count=len(items), expected_digest=codec.set_digest(items)
        )
    assert plain.get_meta("m-s", lost).state == "writing"


def test_a_write_is_read_back_as_it_is_made(plain: Store) -> None:
    plain.begin_set(SetMeta(model="m-w", version="1", task="rating", shape=[1, 2]))
    users, values = ["u1", "u2"], [b"\0" * 8, b"\1" * 8]
    digest = codec.set_digest(zip(users, values, strict=True))
    assert plain.write_checked("m-w", "1", users, values) == (2, digest)
    assert plain.read_values("m-w", "1", ["u2", "nobody", "u1"]) == [values[1], None, values[0]]


@pytest.mark.parametrize(
    ("back", "same"),
    [
        ([b"ab", b"cd"], True),
        ([b"ab", b"ce"], False),  # a value changed
        ([b"ab", None], False),  # a value gone
        ([b"a", b"bcd"], False),  # the same bytes joined, split elsewhere
        ([b"ab"], False),
    ],
)
def test_a_value_read_back_must_equal_the_one_written(back: list[bytes | None], same: bool) -> None:
    written = memoryview(b"abcd")
    assert values_match(back, [written[:2], written[2:]]) is same


def test_deleting_a_version_unlinks_its_keys_a_bounded_batch_at_a_time(plain: Store) -> None:
    version, items = _written(plain, "m-d")
    plain.seal_set(
        "m-d", version, expected_count=len(items), expected_digest=codec.set_digest(items)
    )
    redis = plain.redis
    old = {str(k): str(v) for k, v in redis.config_get("slowlog-*").items()}
    redis.config_set("slowlog-max-len", 100_000)
    redis.config_set("slowlog-log-slower-than", 0)  # log every command, with its arguments
    redis.slowlog_reset()
    try:
        plain.delete_set("m-d", version)
        log = redis.slowlog_get(100_000)
    finally:
        for name, value in old.items():
            redis.config_set(name, value)
    assert not list(redis.scan_iter(match=f"pm:{{m-d:{version}}}:*"))
    removals = [
        entry
        for entry in log
        if entry["command"].split(b" ")[0].upper() in (b"DEL", b"UNLINK")
        and b"{m-d:" in entry["command"]
    ]
    assert removals
    for entry in removals:
        name = entry["command"].split(b" ")[0].upper()
        # Big values (the users set) freed off Redis's main thread, never by a blocking DEL.
        assert name == b"UNLINK", entry["command"][:80]
    # Slowlog keeps 31 arguments and the count of the others: "... (N more arguments)".
    for entry in removals:
        words = entry["command"].split(b" ")
        more = entry["command"].rsplit(b"(", 1)[-1]
        keys = 30 + int(more.split(b" ")[0]) if b"more arguments" in more else len(words) - 1
        assert keys <= BULK_KEYS
