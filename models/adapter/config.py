"""Configuration of the migration adapter, validated at construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from models.errors import ShapeMismatchError


@dataclass(frozen=True)
class AdapterConfig:
    d_in: int  # source prompt width; the sum of the widths when aggregating several sources
    d_out: int  # target model hidden size
    hidden: int = 256  # FFN width: the paper's 4096 serves 2-3B models; small models need less
    dropout: float = 0.1
    # Spread of the target's embedding rows: the output layer starts there, so the first steps
    # neither dwarf nor vanish next to real token embeddings (Gemma's is ~0.04).
    out_std: float = 0.02
    # A linear path x -> W x beside the residual network. Few users teach a linear map far more
    # readily than a deep one; it can start from the data-free vocabulary map (models.instant).
    linear_skip: bool = True
    # Keep only the source table's top principal directions (set_input_statistics): fewer inputs
    # for an adapter fitted on few users (bench/README.md). None keeps all d_in features.
    input_rank: int | None = None
    # The linear path alone (with a bias), no residual network: how the data-free instant map
    # (models.instant) is stored and applied as an adapter.
    linear_only: bool = False

    def __post_init__(self) -> None:
        for name in ("d_in", "d_out", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"AdapterConfig.{name} must be a positive width, got {getattr(self, name)}."
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig.dropout must lie in [0, 1), got {self.dropout}.")
        if self.input_rank is not None and not 1 <= self.input_rank <= self.d_in:
            raise ValueError(
                f"AdapterConfig.input_rank must lie in 1..d_in={self.d_in} or be "
                f"None (all features), got {self.input_rank}."
            )
        if self.linear_only and not self.linear_skip:
            raise ValueError(
                "AdapterConfig.linear_only needs linear_skip=True: the linear path "
                "is then the whole adapter."
            )
        if self.out_std <= 0:
            raise ValueError(f"AdapterConfig.out_std must be positive, got {self.out_std}.")

    def check_input_width(self, width: int) -> None:
        """Refuse prompts whose width is not ``d_in``."""
        if width != self.d_in:
            raise ShapeMismatchError(
                f"Prompts of width {width} given to an adapter for width {self.d_in}."
            )

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def d_features(self) -> int:
        """Width the networks see after the input projection."""
        return self.input_rank or self.d_in
