import json
from typing import Any

import pytest
import torch
from safetensors.torch import save

from models.adapter import AdapterConfig, PumaAdapter, adapter_from_bytes, adapter_to_bytes
from models.errors import ShapeMismatchError


@pytest.mark.parametrize(("d_in", "d_out", "length"), [(576, 640, 1), (32, 48, 8), (80, 48, 1)])
def test_adapter_maps_width_and_keeps_length(d_in: int, d_out: int, length: int) -> None:
    adapter = PumaAdapter(AdapterConfig(d_in=d_in, d_out=d_out, hidden=16))
    out = adapter(torch.randn(5, length, d_in))
    assert out.shape == (5, length, d_out)
    assert torch.isfinite(out).all()


def test_output_starts_at_the_target_embedding_spread() -> None:
    adapter = PumaAdapter(AdapterConfig(d_in=64, d_out=96, hidden=32, out_std=0.04)).eval()
    out = adapter(torch.randn(512, 1, 64) * 0.05)
    assert 0.01 < float(out.detach().std()) < 0.16


def test_wrong_input_width_is_refused() -> None:
    adapter = PumaAdapter(AdapterConfig(d_in=8, d_out=4, hidden=4))
    with pytest.raises(ShapeMismatchError, match="width 9"):
        adapter(torch.randn(2, 1, 9))


@pytest.mark.parametrize("field", ["d_in", "d_out", "hidden"])
def test_config_rejects_non_positive_widths(field: str) -> None:
    kwargs: dict[str, Any] = {"d_in": 4, "d_out": 4, "hidden": 4} | {field: 0}
    with pytest.raises(ValueError, match=field):
        AdapterConfig(**kwargs)


def test_config_rejects_bad_dropout() -> None:
    with pytest.raises(ValueError, match="dropout"):
        AdapterConfig(d_in=4, d_out=4, dropout=1.0)


def test_bytes_round_trip_gives_the_same_mapping() -> None:
    adapter = PumaAdapter(AdapterConfig(d_in=12, d_out=20, hidden=8)).eval()
    adapter.set_input_statistics(torch.randn(10, 1, 12) * 0.1 + 3.0)
    x = torch.randn(3, 2, 12)
    restored = adapter_from_bytes(adapter_to_bytes(adapter))
    assert restored.config == adapter.config
    torch.testing.assert_close(restored(x), adapter(x))


def test_an_adapter_stored_before_the_network_module_still_loads() -> None:
    """Blobs of jobs in flight across an upgrade name the residual blocks at the top level."""
    adapter = PumaAdapter(AdapterConfig(d_in=12, d_out=20, hidden=8)).eval()
    old_state = {k.removeprefix("network."): v for k, v in adapter.state_dict().items()}
    config = json.dumps({k: v for k, v in adapter.config.to_dict().items() if k != "linear_only"})
    restored = adapter_from_bytes(save(old_state, metadata={"config": config}))
    x = torch.randn(3, 1, 12)
    torch.testing.assert_close(restored(x), adapter(x))


def test_linear_path_can_start_from_a_given_map() -> None:
    adapter = PumaAdapter(AdapterConfig(d_in=6, d_out=5, hidden=4))
    linear = torch.randn(6, 5)
    adapter.init_skip(linear)
    assert adapter.skip is not None
    torch.testing.assert_close(adapter.skip.weight, linear.T)
    with pytest.raises(ShapeMismatchError):
        adapter.init_skip(torch.randn(5, 6))


def test_a_linear_path_set_on_the_features_adds_exactly_its_map() -> None:
    adapter = PumaAdapter(AdapterConfig(d_in=6, d_out=5, hidden=4, input_rank=3)).eval()
    adapter.set_input_statistics(torch.randn(40, 1, 6))
    x = torch.randn(7, 2, 6)
    without = adapter(x)
    weight = torch.randn(5, 3)
    adapter.set_linear_path(weight)
    torch.testing.assert_close(adapter(x) - without, adapter.features(x) @ weight.T)
    with pytest.raises(ShapeMismatchError, match=r"\(5, 3\)"):
        adapter.set_linear_path(torch.randn(5, 6))


def test_input_statistics_give_the_table_zero_mean_and_unit_scale() -> None:
    adapter = PumaAdapter(AdapterConfig(d_in=16, d_out=8, hidden=4))
    table = torch.randn(200, 1, 16) * 0.01 + torch.randn(16)  # one shared start plus small deltas
    adapter.set_input_statistics(table)
    z = (table - adapter.input_mean) / adapter.input_scale
    torch.testing.assert_close(z.mean((0, 1)), torch.zeros(16), atol=1e-4, rtol=0)
    assert abs(float(z.pow(2).mean()) - 1.0) < 1e-3
    with pytest.raises(ShapeMismatchError, match="width 16"):
        adapter.set_input_statistics(torch.randn(5, 1, 15))


def test_a_given_map_holds_for_raw_inputs_after_standardising() -> None:
    adapter = PumaAdapter(AdapterConfig(d_in=6, d_out=5, hidden=4)).eval()
    table = torch.randn(50, 1, 6) * 0.2 + 1.0
    adapter.set_input_statistics(table)
    linear, offset = torch.randn(6, 5), torch.randn(5)
    adapter.init_skip(linear, offset)
    with torch.no_grad():
        assert adapter.network is not None
        adapter.network.out_proj.weight.zero_()  # leave only the linear path and the bias
        torch.testing.assert_close(adapter(table), table @ linear + offset, atol=1e-4, rtol=1e-4)


def test_input_rank_keeps_the_tables_principal_directions() -> None:
    adapter = PumaAdapter(AdapterConfig(d_in=16, d_out=8, hidden=4, input_rank=3)).eval()
    # Users differ along three directions of very different spread, plus faint noise.
    directions = torch.linalg.qr(torch.randn(16, 3)).Q
    coords = torch.randn(300, 3) * torch.tensor([3.0, 1.0, 0.3])
    table = (coords @ directions.T + 0.001 * torch.randn(300, 16) + 5.0).unsqueeze(1)
    adapter.set_input_statistics(table)
    assert adapter.input_basis is not None
    # The kept basis spans the three directions: projecting them on it loses nothing.
    kept = adapter.input_basis @ adapter.input_basis.T @ directions
    torch.testing.assert_close(kept, directions, atol=1e-2, rtol=0)
    assert adapter(table).shape == (300, 1, 8)
    assert adapter.network is not None
    assert adapter.network.source_block.net[1].in_features == 3


def test_a_given_map_holds_within_the_kept_directions() -> None:
    adapter = PumaAdapter(AdapterConfig(d_in=6, d_out=5, hidden=4, input_rank=2)).eval()
    table = (torch.randn(50, 2) @ torch.randn(2, 6) + 1.0).unsqueeze(1)  # rank 2 around a start
    adapter.set_input_statistics(table)
    linear, offset = torch.randn(6, 5), torch.randn(5)
    adapter.init_skip(linear, offset)
    assert adapter.network is not None
    with torch.no_grad():
        adapter.network.out_proj.weight.zero_()
        torch.testing.assert_close(adapter(table), table @ linear + offset, atol=1e-4, rtol=1e-4)


def test_input_rank_round_trips_and_needs_enough_prompts() -> None:
    adapter = PumaAdapter(AdapterConfig(d_in=12, d_out=4, hidden=4, input_rank=5)).eval()
    with pytest.raises(ShapeMismatchError, match="at least 6"):
        adapter.set_input_statistics(torch.randn(4, 1, 12))
    adapter.set_input_statistics(torch.randn(40, 1, 12))
    x = torch.randn(3, 1, 12)
    torch.testing.assert_close(adapter_from_bytes(adapter_to_bytes(adapter))(x), adapter(x))


@pytest.mark.parametrize("rank", [0, 13])
def test_config_rejects_an_input_rank_outside_the_width(rank: int) -> None:
    with pytest.raises(ValueError, match="input_rank"):
        AdapterConfig(d_in=12, d_out=4, input_rank=rank)


def test_linear_only_adapter_is_one_affine_map_of_its_input() -> None:
    config = AdapterConfig(d_in=10, d_out=6, input_rank=4, linear_only=True, out_std=0.04)
    adapter = PumaAdapter(config).eval()
    adapter.set_input_statistics(torch.randn(40, 1, 10))
    assert adapter.network is None
    assert sum(p.numel() for p in adapter.parameters()) == 4 * 6 + 6
    out = adapter(torch.randn(5, 1, 10)).detach()
    assert out.shape == (5, 1, 6)
    # The linear path starts at zero, so every user starts from one prompt of the given spread.
    torch.testing.assert_close(out, out[:1].expand_as(out))
    assert 0.01 < float(out.std()) < 0.1
    assert adapter.skip is not None
    with torch.no_grad():
        adapter.skip.weight.normal_()
    a, b = torch.randn(2, 3, 1, 10)
    torch.testing.assert_close(adapter(0.3 * a + 0.7 * b), 0.3 * adapter(a) + 0.7 * adapter(b))
    torch.testing.assert_close(adapter_from_bytes(adapter_to_bytes(adapter))(a), adapter(a))


def test_linear_only_adapter_starts_exactly_at_a_given_map() -> None:
    adapter = PumaAdapter(AdapterConfig(d_in=6, d_out=5, linear_only=True)).eval()
    table = torch.randn(50, 1, 6) * 0.2 + 1.0
    adapter.set_input_statistics(table)
    linear, offset = torch.randn(6, 5), torch.randn(5)
    adapter.init_skip(linear, offset)
    torch.testing.assert_close(adapter(table), table @ linear + offset, atol=1e-4, rtol=1e-4)


def test_config_refuses_linear_only_without_the_linear_path() -> None:
    with pytest.raises(ValueError, match="linear_only needs linear_skip"):
        AdapterConfig(d_in=4, d_out=4, linear_only=True, linear_skip=False)
