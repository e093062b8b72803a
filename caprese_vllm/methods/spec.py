"""Which efficient-inference FF method runs, where, and with what parameters (stored in caprese.json)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MethodName = Literal["dense", "griffin", "cats"]


class MethodSpec(BaseModel):
    """`layers` are the FF blocks that run compressed while generating (and that get a low-rank path)."""

    model_config = ConfigDict(extra="forbid")

    name: MethodName
    density: float = Field(gt=0.0, le=1.0, description="fraction of FF neurons / activations kept")
    layers: list[int] = Field(description="indices of the compressed FF layers")
    # CATS only: one threshold on |act(gate(x))| per compressed layer, keyed by layer index.
    thresholds: dict[int, float] | None = None

    @model_validator(mode="after")
    def _check(self) -> MethodSpec:
        if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
            raise ValueError("layers must be distinct non-negative layer indices")
        if self.name == "cats":
            if self.thresholds is None or set(self.thresholds) != set(self.layers):
                raise ValueError("cats needs exactly one threshold per compressed layer")
            if not all(math.isfinite(t) and t >= 0 for t in self.thresholds.values()):
                raise ValueError("cats thresholds must be finite and >= 0")
        elif self.thresholds is not None:
            raise ValueError(f"thresholds only apply to cats, not {self.name}")
        return self

    def check_layers(self, num_layers: int) -> None:
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise ValueError(f"method.layers {bad} out of range for a model with {num_layers} layers")


def default_layers(name: MethodName, num_layers: int) -> list[int]:
    """Caprese's choice: GRIFFIN on the first half of the layers only, CATS on all of them."""
    if name == "griffin":
        return list(range(num_layers // 2))
    return list(range(num_layers))
