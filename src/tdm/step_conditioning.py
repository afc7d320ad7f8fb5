"""Step conditioning for TDM-unify (paper Sec. 3.3, method.md Decision 8).

`StepConditioned` wraps a backbone network so that the number of sampling steps K (and, for a step-aware fake
score, the step index k) enters through embeddings added to the output of the network's timestep-embedding
module. Both embeddings start at zero, so a freshly wrapped network computes exactly what it wrapped (the
student and the fake score start as the teacher). Any backbone works that names its timestep-embedding module
(`Backbone.time_embedding_module`); the wrapper adds a forward hook there and nothing else.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .config import ConfigError
from .core.algorithm import MAX_STEPS, TDMConfig
from .core.sampling import Cond, Model


def _embedding_width(module: nn.Module, name: str) -> int:
    """Width of the timestep embedding: the module's `out_features`, else that of its last linear layer."""
    if isinstance(getattr(module, "out_features", None), int):
        return module.out_features
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"time embedding module {name!r} has no out_features and no nn.Linear to read its width from")
    return linears[-1].out_features


class StepConditioned(nn.Module):
    """`forward(x_t, t, cond, num_steps=None, step_index=None)`: the wrapped model, with zero-initialised
    embeddings of K ([B] long) and k ([B] long) added to its timestep embedding."""

    def __init__(self, model: nn.Module, time_embedding_module: str, max_steps: int = MAX_STEPS):
        super().__init__()
        self.model = model
        self.max_steps = max_steps
        target = model.get_submodule(time_embedding_module)
        width = _embedding_width(target, time_embedding_module)
        self.num_steps_embedding = nn.Embedding(max_steps + 1, width)
        self.step_index_embedding = nn.Embedding(max_steps + 1, width)
        nn.init.zeros_(self.num_steps_embedding.weight)
        nn.init.zeros_(self.step_index_embedding.weight)
        self._extra: Tensor | None = None  # the embedding to add during the current forward only
        target.register_forward_hook(self._add_step_embedding)  # a bound method: survives deepcopy correctly

    def _add_step_embedding(self, module: nn.Module, inputs, output: Tensor) -> Tensor:
        return output if self._extra is None else output + self._extra.to(output.dtype)

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond, num_steps: Tensor | None = None,
                step_index: Tensor | None = None) -> Tensor:
        extra = None
        for index, embedding in ((num_steps, self.num_steps_embedding), (step_index, self.step_index_embedding)):
            if index is None:
                continue
            if int(index.max()) > self.max_steps or int(index.min()) < 1:
                raise ValueError(f"step conditioning takes values in [1, {self.max_steps}], "
                                 f"got {index.unique().tolist()}")
            e = embedding(index.long().to(x_t.device))
            extra = e if extra is None else extra + e
        self._extra = extra
        try:
            return self.model(x_t, t, cond)
        finally:
            self._extra = None


def bind_steps(model: Model, config: TDMConfig, num_steps: int, step_index: Tensor | None = None) -> Model:
    """`model` sampling with K = num_steps, as a plain `(x_t, t, cond)` callable: K is passed when the config
    trains TDM-unify, the per-sample step index k when it makes the fake score step-aware; `model` itself when
    there is nothing to pass."""
    num_steps = num_steps if config.num_steps_set else None
    step_index = step_index if config.fake_step_condition else None
    if num_steps is None and step_index is None:
        return model

    def bound(x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        ks = None if num_steps is None else torch.full((x_t.shape[0],), num_steps, device=x_t.device)
        return model(x_t, t, cond, num_steps=ks, step_index=step_index)

    return bound


def initial_network(backbone, config: TDMConfig) -> nn.Module:
    """What the student and the fake score start from: the backbone's initial weights, wrapped in a fresh
    `StepConditioned` when the TDM config conditions on steps (the backbone's own modules stay untouched)."""
    initial = backbone.initial_weights()
    if not config.step_conditioned:
        return initial
    if backbone.time_embedding_module is None:
        raise ConfigError(f"tdm.num_steps_set / tdm.fake_step_condition: backbone {backbone.name!r} does not name "
                          f"a timestep-embedding module to condition on")
    return StepConditioned(copy.deepcopy(initial), backbone.time_embedding_module)
