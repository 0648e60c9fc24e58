import pytest
import torch

from models.adapter import AdapterConfig, FoldedAdapter, PumaAdapter, fold
from models.errors import ShapeMismatchError
from models.migration import map_prompts


def trained_like(config: AdapterConfig, *, length: int = 1, seed: int = 0) -> PumaAdapter:
    """An adapter with input statistics and every weight moved off its initial value, so the
    norms' gains and biases and the zero-started linear path all take part."""
    torch.manual_seed(seed)
    adapter = PumaAdapter(config)
    adapter.set_input_statistics(torch.randn(256, length, config.d_in) * 0.02 + 0.01)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return adapter.eval()


def prompts(config: AdapterConfig, *, users: int = 300, length: int = 1) -> torch.Tensor:
    return torch.randn(users, length, config.d_in) * 0.02 + 0.01


CONFIGS = {
    "recipe": AdapterConfig(d_in=96, d_out=80, hidden=16, input_rank=12),
    "every feature": AdapterConfig(d_in=40, d_out=80, hidden=16),
    "no linear path": AdapterConfig(d_in=96, d_out=80, hidden=16, input_rank=12, linear_skip=False),
    "narrowest gain": AdapterConfig(d_in=24, d_out=34, hidden=16, input_rank=8),
}


@pytest.mark.parametrize("length", [1, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_folded_map_gives_the_adapters_values(name: str, length: int) -> None:
    config = CONFIGS[name]
    adapter = trained_like(config, length=length)
    folded = fold(adapter)
    assert isinstance(folded, FoldedAdapter)
    x = prompts(config, length=length)
    with torch.inference_mode():
        expected, got = adapter(x), folded(x)
    assert got.shape == (300, length, config.d_out)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_folded_map_reads_a_fraction_of_the_weights() -> None:
    config = AdapterConfig(d_in=576, d_out=640, hidden=64, input_rank=64)  # the recipe's shape
    folded = fold(trained_like(config))
    assert isinstance(folded, FoldedAdapter)
    assert folded.out_weight.shape == (2 * 64 + 1 + 64, 640)  # instead of 640 x 640 and 64 x 640
    assert folded.target_weight.shape == (64 + 1, 64)  # instead of 640 x 64


@pytest.mark.parametrize(
    "config",
    [
        AdapterConfig(d_in=24, d_out=33, hidden=16),  # 2 * 16 + 1 = 33: nothing to gain
        AdapterConfig(d_in=24, d_out=32, linear_only=True),
    ],
    ids=["wide network", "linear only"],
)
def test_an_adapter_with_nothing_to_fold_maps_as_it_is(config: AdapterConfig) -> None:
    adapter = trained_like(config)
    adapter.train()
    assert fold(adapter) is adapter
    assert not adapter.training  # mapped in eval mode: no dropout


def test_folding_copies_the_weights() -> None:
    config = CONFIGS["recipe"]
    adapter = trained_like(config)
    adapter.train()
    folded = fold(adapter)
    x = prompts(config)
    with torch.inference_mode():
        before = folded(x)
    assert adapter.training  # folding leaves a training adapter training
    assert not any(module.training for module in folded.modules())  # and maps without dropout
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(1.0)
    with torch.inference_mode():
        assert torch.equal(folded(x), before)


def test_map_prompts_folds_the_same_way_each_time() -> None:
    """Workers map through a kept folded adapter, checks through a fresh fold: same bits."""
    config = CONFIGS["recipe"]
    adapter = trained_like(config)
    x = prompts(config, users=700)
    with torch.inference_mode():
        kept = fold(adapter)
        assert torch.equal(map_prompts(adapter, x), map_prompts(kept, x))


def test_a_prompt_of_another_width_is_refused() -> None:
    config = CONFIGS["recipe"]
    folded = fold(trained_like(config))
    with pytest.raises(ShapeMismatchError, match="width 95"):
        folded(torch.zeros(2, 1, 95))
