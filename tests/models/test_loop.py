import copy

import numpy as np
import pytest
import torch

from models.data import Splits, load_interactions, split_chronological
from models.errors import DataError
from models.foundation import FoundationModel
from models.loop import (
    Examples,
    PromptTable,
    fit,
    fit_head,
    index_users,
    label_logits,
    predict,
    score,
)
from models.migration import MigrationConfig
from models.tasks import Task, get_task
from models.training import mean_target, random_prompts


def _setup(
    model: FoundationModel, task: Task, splits: Splits
) -> tuple[PromptTable, torch.nn.Module, Examples, Examples]:
    row_of = index_users(splits.users)
    prompts = random_prompts(model, n_users=len(splits.users), prompt_length=1, seed=0)
    head = task.make_head(mean_target=1.0)  # far from the data's mean on purpose
    return (
        PromptTable(prompts).requires_grad_(False),
        head,
        Examples.build(task, splits.train, row_of=row_of),
        Examples.build(task, splits.val, row_of=row_of),
    )


def test_label_logits_keep_example_order(
    tiny_llama: FoundationModel, rating: Task, tiny_splits: Splits
) -> None:
    table, _, train, _ = _setup(tiny_llama, rating, tiny_splits)
    rows = np.arange(7)
    batched = label_logits(tiny_llama, rating, table, train.subset(rows), batch_size=3)
    one_by_one = torch.cat(
        [label_logits(tiny_llama, rating, table, train.subset(rows[i : i + 1])) for i in rows]
    )
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=1e-4)


def test_head_fit_on_cached_logits_improves_validation_and_counts_one_pass_per_example(
    tiny_llama: FoundationModel, rating: Task, tiny_splits: Splits
) -> None:
    table, head, train, val = _setup(tiny_llama, rating, tiny_splits)
    before = score(rating, val, predict(tiny_llama, rating, table, head, val))
    result = fit_head(
        model=tiny_llama,
        task=rating,
        prompt_source=table,
        head=head,
        train=train,
        val=val,
        epochs=30,
        lr=1e-2,
        batch_size=16,
        seed=0,
        max_examples=len(train) // 2,
    )
    after = score(rating, val, predict(tiny_llama, rating, table, head, val))
    assert result.example_passes == len(train) // 2  # 30 epochs, one LM pass per sampled example
    assert len(result.history) == 30
    assert after == result.best_metric
    assert after < before
    assert (
        abs(mean_target(tiny_splits) - float(predict(tiny_llama, rating, table, head, val).mean()))
        < 0.5
    )


def test_a_validation_split_of_one_answer_is_refused_before_any_training(
    tiny_llama: FoundationModel,
) -> None:
    binary = get_task("binary")
    splits = split_chronological(
        load_interactions("synthetic-tiny", task="binary"), n_test=4, n_val=4, max_train=16
    )
    table, head, train, val = _setup(tiny_llama, binary, splits)
    table.requires_grad_(True)
    all_yes = val.subset(np.flatnonzero(val.targets == 1))
    assert 0 < len(all_yes) < len(val)
    before = copy.deepcopy((table.state_dict(), head.state_dict()))
    optimizer = torch.optim.AdamW([*table.parameters(), *head.parameters()], lr=1e-2)
    with pytest.raises(DataError, match=r"only 'Yes' answers.*both 'No' and 'Yes'"):
        fit(
            model=tiny_llama,
            task=binary,
            prompt_source=table,
            head=head,
            optimizer=optimizer,
            train=train,
            val=all_yes,
            epochs=2,
            batch_size=16,
            patience=1,
            seed=0,
        )
    with pytest.raises(DataError, match="AUC is undefined"):
        fit_head(
            model=tiny_llama,
            task=binary,
            prompt_source=table,
            head=head,
            train=train,
            val=all_yes,
            epochs=2,
            lr=1e-2,
            batch_size=16,
            seed=0,
        )
    torch.testing.assert_close((table.state_dict(), head.state_dict()), before)


def test_user_weights_pull_the_fitted_head_towards_the_heavy_users(
    tiny_llama: FoundationModel, rating: Task, tiny_splits: Splits
) -> None:
    labels = tiny_splits.train_labels()
    generous = {u for u in tiny_splits.users if np.mean(labels[u]) >= mean_target(tiny_splits)}
    weights = {u: 20.0 if u in generous else 1.0 for u in tiny_splits.users}
    row_of = index_users(tiny_splits.users)
    weighted = Examples.build(rating, tiny_splits.train, row_of=row_of, user_weights=weights)
    assert weighted.weights is not None
    assert [w == 20.0 for w in weighted.weights] == [u in generous for u in weighted.user_ids]
    head_of = weighted.subset(np.arange(5)).weights
    assert head_of is not None and np.array_equal(head_of, weighted.weights[:5])

    def mean_prediction(train: Examples) -> float:
        table, head, _, val = _setup(tiny_llama, rating, tiny_splits)
        fit_head(
            model=tiny_llama,
            task=rating,
            prompt_source=table,
            head=head,
            train=train,
            val=None,
            epochs=30,
            lr=1e-2,
            batch_size=16,
            seed=0,
        )
        return float(predict(tiny_llama, rating, table, head, val).mean())

    plain = Examples.build(rating, tiny_splits.train, row_of=row_of)
    assert mean_prediction(weighted) > mean_prediction(plain) + 0.1


@pytest.mark.parametrize("field", ["head_warmup_examples", "epochs", "hidden", "input_rank"])
def test_migration_config_names_the_field_to_fix(field: str) -> None:
    with pytest.raises(ValueError, match=f"MigrationConfig.{field}"):
        MigrationConfig(**{field: 0})  # type: ignore[arg-type]


def test_input_rank_needs_standardised_inputs() -> None:
    with pytest.raises(ValueError, match="standardize_inputs=True"):
        MigrationConfig(input_rank=8, standardize_inputs=False)
