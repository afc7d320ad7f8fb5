"""The student's K-step grid and its deterministic rollout, shared by training and inference (method.md B).

A model is any callable `model(x_t, t, cond) -> raw output`; `cond` is a tensor, a dict of tensors or None,
batched along dim 0. The student runs without guidance; `guided` wraps a teacher with classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .prediction import PredictionType, to_x0_eps
from .schedules import Schedule

Cond = Tensor | dict | None
Model = Callable[[Tensor, Tensor, Cond], Tensor]


@dataclass(frozen=True)
class StudentGrid:
    """Student timesteps t_K > ... > t_1 and, per step, the lower end of its noise band.

    `timesteps[i]` is the level visited at step k = K - i. `lower[i]` is where that step's band [lower, t_k]
    starts: the trajectory point t_mid the fake score diffuses from (method.md C.3).
    """

    timesteps: tuple[float, ...]
    lower: tuple[float, ...]

    def __post_init__(self):
        ts = self.timesteps
        if len(ts) < 1 or len(ts) != len(self.lower):
            raise ValueError("a grid needs K >= 1 timesteps and one lower bound per step")
        if any(b >= a for a, b in zip(ts, ts[1:])) or any(lo >= t or lo < 0 for lo, t in zip(self.lower, ts)):
            raise ValueError(f"grid timesteps must strictly decrease and lie above their bands' lower ends: {ts}")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def level(self, k: Tensor, field: str = "timesteps") -> Tensor:
        """Per-sample lookup of step k (1..K) in `timesteps` or `lower` (vectorised)."""
        table = torch.tensor(getattr(self, field), device=k.device, dtype=torch.float64)
        return table[self.num_steps - k]


def uniform_grid(total_steps: int, num_steps: int) -> StudentGrid:
    """The official grid: t_k = k * (total_steps // K) - 1, bands start at (k - 1) * stride (method.md B).

    total_steps = 900, K = 4 gives 899, 674, 449, 224 with bands starting at 675, 450, 225, 0.
    """
    if not 1 <= num_steps <= total_steps:
        raise ValueError(f"num_steps must be in [1, total_steps={total_steps}], got {num_steps}")
    stride = total_steps // num_steps
    ks = range(num_steps, 0, -1)
    return StudentGrid(tuple(float(k * stride - 1) for k in ks), tuple(float((k - 1) * stride) for k in ks))


def explicit_grid(timesteps: list[float]) -> StudentGrid:
    """A user-given descending list (e.g. CogVideoX's 999, 856, 665, 399); each band ends at the next level."""
    ts = tuple(float(t) for t in timesteps)
    return StudentGrid(ts, ts[1:] + (0.0,))


def flow_grid(num_steps: int, num_train_timesteps: int = 1000) -> StudentGrid:
    """Uniform grid t_k = T k / K on the flow time axis; `FlowMatch` applies the shift (sigma(t_K) = 1)."""
    ts = [num_train_timesteps * k / num_steps for k in range(num_steps, -1, -1)]
    return StudentGrid(tuple(ts[:-1]), tuple(ts[1:]))


def teacher_grid(schedule: Schedule, num_steps: int) -> StudentGrid:
    """A teacher's own K-step DDIM sampler, spanning its whole schedule (the baselines students are compared to)."""
    T = schedule.num_train_timesteps
    return uniform_grid(T, num_steps) if schedule.discrete else flow_grid(num_steps, T)


def map_cond(fn: Callable[..., Tensor], *conds: Cond) -> Cond:
    """Apply `fn` leaf-wise to conditioning batches of the same structure (tensor, dict of tensors or None)."""
    if conds[0] is None:
        return None
    if isinstance(conds[0], dict):
        return {key: map_cond(fn, *(c[key] for c in conds)) for key in conds[0]}
    return fn(*conds)


def concat_batch(a: Cond, b: Cond) -> Cond:
    """Concatenate two conditioning batches along dim 0."""
    return map_cond(lambda x, y: torch.cat([x, y]), a, b)


def cond_to(cond: Cond, device) -> Cond:
    """Move a conditioning batch to `device`."""
    return map_cond(lambda x: x.to(device), cond)


GuidanceRule = Callable[[Tensor, Tensor, float], Tensor]  # (conditional output, unconditional output, scale)


def linear_guidance(out_cond: Tensor, out_uncond: Tensor, scale: float) -> Tensor:
    """uncond + scale (cond - uncond): linear in the raw output, so the same on x0 or eps for every prediction."""
    return out_uncond + scale * (out_cond - out_uncond)


def guided(model: Model, uncond: Cond, scale: float, rule: GuidanceRule = linear_guidance) -> Model:
    """Classifier-free guidance by `rule` (a teacher's own, e.g. Qwen-Image's norm-rescaled true CFG), as one
    batched 2B call (no call if scale = 1)."""
    if scale == 1.0:
        return model

    def guided_model(x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        out_cond, out_uncond = model(torch.cat([x, x]), torch.cat([t, t]), concat_batch(cond, uncond)).chunk(2)
        return rule(out_cond, out_uncond, scale)

    return guided_model


def rows_of(cond: Cond, rows: Tensor) -> Cond:
    """The conditioning of the samples `rows` (indices into dim 0)."""
    return map_cond(lambda x: x[rows], cond)


@dataclass
class Trajectory:
    """Rollout states x_{t_k} and the model's (x0, eps) at each computed level; dicts keyed by step k.

    A per-sample rollout (`rollout_per_sample`) leaves NaN in the rows of samples that did not reach a level.
    `generator_step`, when taken: each sample's (x0, eps) at its generator level, carrying gradient."""

    states: dict[int, Tensor]
    x0: dict[int, Tensor]
    eps: dict[int, Tensor]
    generator_step: tuple[Tensor, Tensor] | None = None

    def gather(self, field: str, k: Tensor) -> Tensor:
        """Per-sample pick: row i of the result is `field` at level k[i] (every k[i] must be computed)."""
        table = getattr(self, field)
        levels = sorted(table)
        stacked = torch.stack([table[j] for j in levels])  # [L, B, ...]
        index = torch.searchsorted(torch.tensor(levels, device=k.device), k)
        return stacked[index, torch.arange(k.numel(), device=k.device)]


def _grid_time(grid: StudentGrid, schedule: Schedule, levels: Tensor) -> Tensor:
    """Each sample's grid level t_k (k = levels[i]), snapped to the schedule."""
    return schedule.snap(grid.level(levels).to(torch.get_default_dtype()))


def rollout(model: Model, noise: Tensor, cond: Cond, grid: StudentGrid, schedule: Schedule,
            prediction: PredictionType, *, stop_level: int = 1, return_trajectory: bool = False,
            callback: Callable[[int, Tensor, Tensor], None] | None = None) -> Tensor | Trajectory:
    """Deterministic K-step sampling from pure noise at t_K (method.md B; TDM paper Sec. 3.1).

    Evaluates the model at levels K, ..., stop_level and keeps the state one level below the last
    evaluation, so a caller that needs only shallow levels pays only for those. Returns x0 predicted at
    `stop_level` (the final sample when stop_level = 1) or the whole `Trajectory`.
    `callback(k, x0, eps)` is called after each model evaluation.
    """
    K = grid.num_steps
    if not 1 <= stop_level <= K:
        raise ValueError(f"stop_level must be in [1, {K}], got {stop_level}")
    batch = noise.shape[0]
    traj = Trajectory(states={K: noise}, x0={}, eps={})
    x = noise
    for k in range(K, stop_level - 1, -1):
        level = torch.full((batch,), k, device=noise.device)
        t = _grid_time(grid, schedule, level)
        x0, eps = to_x0_eps(model(x, t, cond), x, t, schedule, prediction)
        traj.x0[k], traj.eps[k] = x0, eps
        if callback is not None:
            callback(k, x0, eps)
        if k > 1:
            x = schedule.ddim_step(x0, eps, _grid_time(grid, schedule, level - 1))
            traj.states[k - 1] = x
    return traj if return_trajectory else traj.x0[stop_level]


def _store(table: dict[int, Tensor], levels: Tensor, rows: Tensor, values: Tensor, batch: int) -> None:
    """Write `values` (detached) into table[k] at `rows`, row by row at its level k; a new level starts as NaN."""
    for k in levels.unique().tolist():
        at = levels == k
        if k not in table:
            table[k] = values.new_full((batch, *values.shape[1:]), float("nan"))
        table[k][rows[at]] = values[at].detach()


def rollout_per_sample(model: Model, noise: Tensor, cond: Cond, grid: StudentGrid, schedule: Schedule,
                       prediction: PredictionType, stop_level: Tensor, grad_level: Tensor | None = None,
                       any_left: Callable[[Tensor], bool] | None = None) -> Trajectory:
    """The rollout of `rollout`, with each sample evaluated only at the levels it needs: sample i at levels
    K, ..., stop_level[i] (and its state one level below). At level grad_level[i] (>= stop_level[i]), if given,
    sample i's forward carries gradient: those forwards form `Trajectory.generator_step`, and their detached
    values continue the rollout.

    With gradient levels the rollout runs in three stages, so that the differentiable forwards are one call
    (one backward of the whole batch, not one per level): every sample down to just above its gradient level,
    level by level; one call of all samples, each at its gradient level, with gradient; then, without, the
    samples that go deeper, each at its own next level per call.

    `any_left(mask)`: whether a stage goes on while `mask` marks the samples still due (default: any of them).
    Sharded training (FSDP) passes one that asks every process, so all make the same number of calls: each call
    of a sharded network is a collective. A process with no sample left then calls the model on its first
    sample at level K and drops the result."""
    any_left = any_left or (lambda mask: bool(mask.any()))
    K, batch = grid.num_steps, noise.shape[0]
    if not bool(((stop_level >= 1) & (stop_level <= K)).all()):
        raise ValueError(f"stop_level must lie in [1, {K}]")
    if grad_level is not None and not bool(((grad_level >= stop_level) & (grad_level <= K)).all()):
        raise ValueError(f"grad_level must lie in [stop_level, {K}]")
    traj = Trajectory(states={K: noise}, x0={}, eps={})
    state, level = noise.clone(), torch.full((batch,), K, device=noise.device)  # each sample's next evaluation

    def evaluate(rows: Tensor) -> tuple[Tensor, Tensor]:
        """One model call for `rows`, each at its current level; records (x0, eps) and steps them one level down."""
        x, k = state[rows], level[rows]
        t = _grid_time(grid, schedule, k)
        x0, eps = to_x0_eps(model(x, t, rows_of(cond, rows)), x, t, schedule, prediction)
        _store(traj.x0, k, rows, x0, batch)
        _store(traj.eps, k, rows, eps, batch)
        going_on = k > 1
        if going_on.any():
            below, moving = k[going_on] - 1, rows[going_on]
            x_next = schedule.ddim_step(x0[going_on].detach(), eps[going_on].detach(),
                                        _grid_time(grid, schedule, below))
            state[moving] = x_next
            _store(traj.states, below, moving, x_next, batch)
        level[rows] -= 1
        return x0, eps

    def evaluate_due(due: Tensor) -> None:
        if due.any():
            evaluate(due.nonzero()[:, 0])
        else:  # only other processes have samples due: one call in step with theirs
            first = torch.zeros(1, dtype=torch.long, device=noise.device)
            model(noise[first], _grid_time(grid, schedule, torch.full_like(first, K)), rows_of(cond, first))

    pause = stop_level - 1 if grad_level is None else grad_level  # stage 1 runs the levels above `pause`
    with torch.no_grad():
        while any_left(above := level > pause):
            evaluate_due(above)
    if grad_level is not None:
        with torch.enable_grad():
            traj.generator_step = evaluate(torch.arange(batch, device=noise.device))
        with torch.no_grad():
            while any_left(deeper := level >= stop_level):
                evaluate_due(deeper)
    return traj
