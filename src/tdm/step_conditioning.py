"""Step conditioning for TDM-unify (paper Sec. 3.3, method.md Decision 8).

`StepConditioned` wraps a backbone network so that the number of sampling steps K and/or the step index k enter
through embeddings added to the output of the network's timestep-embedding module. Each role holds an embedding
for exactly the step inputs it is given (`step_inputs` in tdm.core.algorithm, whose TDM feeds them): the student
K under TDM-unify, the fake score K under TDM-unify and k when it is step-aware; a role given neither is not
wrapped. (An embedding a role never uses gets no gradient, which multi-process DDP refuses.) The embeddings start at
zero, so a freshly wrapped network computes exactly what it wrapped (the student and the fake score start as the
teacher). Any backbone works that names its timestep-embedding module (`Backbone.time_embedding_module`); the
wrapper adds a forward hook there and nothing else.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from .core.algorithm import MAX_STEPS, NUM_STEPS, STEP_INDEX, TDMConfig, step_inputs
from .core.sampling import Cond
from .errors import ConfigError


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
    embeddings of K ([B] long) and/or k ([B] long) added to its timestep embedding. `inputs` names the step
    inputs it holds an embedding for (attributes `num_steps_embedding`, `step_index_embedding`)."""

    def __init__(self, model: nn.Module, time_embedding_module: str,
                 inputs: tuple[str, ...] = (NUM_STEPS, STEP_INDEX), max_steps: int = MAX_STEPS):
        super().__init__()
        if not inputs or not set(inputs) <= {NUM_STEPS, STEP_INDEX}:
            raise ValueError(f"step inputs must be a non-empty subset of {(NUM_STEPS, STEP_INDEX)}, got {inputs}")
        self.model, self.inputs, self.max_steps = model, tuple(inputs), max_steps
        target = model.get_submodule(time_embedding_module)
        width = _embedding_width(target, time_embedding_module)
        for name in self.inputs:
            embedding = nn.Embedding(max_steps + 1, width)
            nn.init.zeros_(embedding.weight)
            setattr(self, f"{name}_embedding", embedding)
        self._extra: Tensor | None = None  # the embedding to add during the current forward only
        target.register_forward_hook(self._add_step_embedding)  # a bound method: survives deepcopy correctly

    def _add_step_embedding(self, module: nn.Module, inputs, output: Tensor) -> Tensor:
        return output if self._extra is None else output + self._extra.to(output.dtype)

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond, num_steps: Tensor | None = None,
                step_index: Tensor | None = None) -> Tensor:
        extra = None
        for name, index in ((NUM_STEPS, num_steps), (STEP_INDEX, step_index)):
            if index is None:
                continue
            if name not in self.inputs:
                raise ValueError(f"this network holds embeddings for {list(self.inputs)} only, got {name}")
            if int(index.max()) > self.max_steps or int(index.min()) < 1:
                raise ValueError(f"step conditioning takes values in [1, {self.max_steps}], "
                                 f"got {index.unique().tolist()}")
            e = getattr(self, f"{name}_embedding")(index.long().to(x_t.device))
            extra = e if extra is None else extra + e
        self._extra = extra
        try:
            return self.model(x_t, t, cond)
        finally:
            self._extra = None


def condition_for_role(network: nn.Module, backbone, config: TDMConfig, role: str) -> nn.Module:
    """`network` as `role` trains it: wrapped in a `StepConditioned` holding an embedding for each step input
    the role is given, or `network` itself when it is given none. `network` must be the role's own copy: the
    wrapper hooks its timestep-embedding module."""
    inputs = step_inputs(config, role)
    if not inputs:
        return network
    if backbone.time_embedding_module is None:
        raise ConfigError(f"tdm.num_steps_set / tdm.fake_step_condition: backbone {backbone.name!r} does not name "
                          f"a timestep-embedding module to condition on")
    return StepConditioned(network, backbone.time_embedding_module, inputs)


def initial_network(backbone, config: TDMConfig, role: str) -> nn.Module:
    """What `role` starts from: its own copy of the backbone's initial weights, conditioned as the role is
    (`condition_for_role`); the backbone's own modules stay untouched."""
    return condition_for_role(copy.deepcopy(backbone.initial_weights()), backbone, config, role)


def accept_earlier_layout(student: nn.Module) -> None:
    """Let `student` load a checkpoint written when every step-conditioned role held both embeddings: the one
    the student never used (all zeros: it never had a gradient) is dropped, and so is the wrapper of a student
    that takes no step input. Any other difference still fails to load."""
    held = getattr(student, "inputs", ())

    def convert(module, state_dict, prefix, *args) -> None:
        if f"{prefix}{STEP_INDEX}_embedding.weight" not in state_dict:  # students never hold k: not that layout
            return
        for name in (NUM_STEPS, STEP_INDEX):
            key = f"{prefix}{name}_embedding.weight"
            if name not in held and key in state_dict and not state_dict[key].any():
                del state_dict[key]
        inner = f"{prefix}model."
        if not held and state_dict and all(key.startswith(inner) for key in state_dict):
            for key in list(state_dict):
                state_dict[prefix + key.removeprefix(inner)] = state_dict.pop(key)

    student.register_load_state_dict_pre_hook(convert)
