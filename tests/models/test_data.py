import json
from pathlib import Path

import pytest

from models.data import Interaction, load_interactions, split_chronological
from models.errors import DataError


def rows(user: str, n: int) -> list[Interaction]:
    return [
        Interaction(user, f"i{t}", f"item{t}", float(1 + t % 5), float(100 - t)) for t in range(n)
    ]


def test_split_is_chronological_per_user() -> None:
    splits = split_chronological(rows("a", 50), n_test=5, n_val=5, max_train=30)
    times = lambda part: [r.timestamp for r in part["a"]]  # noqa: E731
    assert len(splits.test["a"]) == 5 and len(splits.val["a"]) == 5 and len(splits.train["a"]) == 30
    assert max(times(splits.train)) < min(times(splits.val))
    assert max(times(splits.val)) < min(times(splits.test))
    # the most recent training interactions are kept
    assert max(times(splits.train)) == sorted(r.timestamp for r in rows("a", 50))[39]


def test_latest_train_keeps_each_users_most_recent_interactions() -> None:
    splits = split_chronological(rows("a", 30) + rows("b", 13), n_test=5, n_val=5, max_train=20)
    latest = splits.latest_train(2)
    assert {u: len(v) for u, v in latest.items()} == {"a": 2, "b": 2}
    assert latest["a"] == splits.train["a"][-2:]
    assert splits.latest_train(None) == splits.train
    assert splits.latest_train(50)["b"] == splits.train["b"]  # fewer than the cap: all of them


def test_users_without_training_interactions_are_reported_not_dropped_silently() -> None:
    splits = split_chronological(rows("a", 20) + rows("b", 10), n_test=5, n_val=5)
    assert splits.users == ["a"]
    assert splits.skipped_users == ["b"]


def test_no_trainable_user_is_an_error() -> None:
    with pytest.raises(DataError, match="lower n_test"):
        split_chronological(rows("a", 4))


def test_jsonl_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    records = [{"user_id": "u1", "item_text": "Heat (1995)", "label": 4, "timestamp": 1}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (loaded,) = load_interactions(str(path), task="rating")
    assert loaded == Interaction("u1", "Heat (1995)", "Heat (1995)", 4.0, 1.0)
    path.write_text('{"user_id": "u1"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:1"):
        load_interactions(str(path), task="rating")
    path.write_text(json.dumps(records[0] | {"label": 9}) + "\n")
    with pytest.raises(DataError, match=r"1\.\.5"):
        load_interactions(str(path), task="rating")


@pytest.mark.parametrize("user", ["bad id", "caf\u00e9", "../escaped", "/abs", "", "u" * 129])
def test_jsonl_user_ids_follow_the_apis_rule(tmp_path: Path, user: str) -> None:
    """A user the API could not read, erase or export never enters through a dataset."""
    path = tmp_path / "data.jsonl"
    good = {"user_id": "u-1.a:B_2", "item_text": "x", "label": 4, "timestamp": 1}
    path.write_text(json.dumps(good) + "\n" + json.dumps(good | {"user_id": user}) + "\n")
    with pytest.raises(DataError, match=r"data\.jsonl:2: user_id .* is invalid; use 1-128"):
        load_interactions(str(path), task="rating")
    path.write_text(json.dumps(good | {"user_id": 42}) + "\n")  # a number is its digits
    assert [r.user_id for r in load_interactions(str(path), task="rating")] == ["42"]


def test_empty_and_missing_datasets_are_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no interactions"):
        load_interactions(str(tmp_path / "empty.jsonl"), task="rating")
    with pytest.raises(DataError, match="Unknown dataset"):
        load_interactions(str(tmp_path / "nope.jsonl"), task="rating")


def test_user_sample_is_seeded() -> None:
    a = load_interactions("synthetic-tiny", task="binary", max_users=5, seed=1)
    b = load_interactions("synthetic-tiny", task="binary", max_users=5, seed=1)
    assert a == b and len({r.user_id for r in a}) == 5
    assert {r.label for r in a} <= {0.0, 1.0}
