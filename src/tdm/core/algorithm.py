"""One TDM iteration, backbone-agnostic: vectorised draws, one shared rollout, the two losses (method.md I).

`TDM` owns no optimiser, device or distributed object. The trainer calls, per iteration:
    draws  = tdm.draw_iteration(...)          K, then the draws of each fake update and of the generator
    traj   = tdm.rollout_for(student, ...)    one rollout at their K, each sample only as deep as its draws; the
                                              generator's student forward taken from it, with gradient
    tdm.fake_score_loss(fake, traj, ...)      -> step the fake score first
    tdm.generator_loss(student, ...)          -> then the student, against the updated fake score
The trainer passes the roles as they are: each method gives a role the step inputs it takes (`bind_steps`).
Passes per iteration at K = 4 with k uniform (method.md H.2): student 3.125F (one with gradient) + 1B, teacher
one 2B call, fake 1F/1B + 1F: about 7.1F + 2B, against the official code's 11F + 2B.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .losses import GENERATOR_LOSSES, IMPORTANCE_WEIGHTS, fake_score_loss, generator_loss, importance_weight
from .prediction import PredictionType, terminal_x0_undefined, to_x0, to_x0_eps
from .sampling import (
    Cond,
    GuidanceRule,
    Model,
    StudentGrid,
    Trajectory,
    explicit_grid,
    flow_grid,
    guided,
    linear_guidance,
    rollout,
    rollout_per_sample,
    uniform_grid,
)
from .schedules import Schedule, append_dims

INTERVALS = ("separate", "overlap")
DIFFUSE_FROM = ("trajectory", "clean")
MAX_STEPS = 64  # largest K a step-conditioned model embeds
NUM_STEPS, STEP_INDEX = "num_steps", "step_index"  # the step inputs: K of the rollout, k of the sample's step
STUDENT, FAKE_SCORE = "student", "fake_score"      # the trainable roles


@dataclass(frozen=True)
class TDMConfig:
    num_steps: int = 4                   # K, the student's number of sampling steps
    total_steps: int = 900               # VP grid: t_k = k * (total_steps // K) - 1 (official: 900)
    timesteps: tuple[float, ...] | None = None  # explicit descending grid; overrides total_steps
    interval: str = "separate"           # tau in [t_mid, t_k - margin) ("separate") or up to t_K ("overlap")
    tau_min: float = 20.0                # lowest tau drawn (time-axis units; 20 of 1000 in the code)
    tau_margin: float = 10.0             # tau stays this far below the band's top
    randmid: bool = False                # draw t_mid in [lower, t_k - randmid_margin) instead of lower
    randmid_margin: float = 20.0
    snr_clamp: float = 5.0               # Min-SNR weight of the fake-score loss (inf = off)
    importance_weight: str = "tempered"  # tempered | off | clipped
    importance_clip: float = 20.0        # cap for importance_weight = clipped
    guidance_scale: float = 4.5          # teacher CFG inside the generator target (1 = no guidance)
    generator_loss: str = "pseudo_huber"  # pseudo_huber (per element) | mse | pseudo_huber_vector
    huber_c: float = 1e-3                # c of the per-element pseudo-Huber
    num_steps_set: tuple[int, ...] = ()  # TDM-unify: K drawn per iteration from this set, fed to student and
                                         # fake score as a condition (paper Sec. 3.3); () = fixed num_steps
    fake_step_condition: bool = False    # the fake score also sees the step index k (step-aware fake score)
    diffuse_from: str = "trajectory"     # trajectory: the fake score's input diffuses the student's DDIM step to
                                         # t_mid (paper); clean: diffuses the clean prediction x0 (ablation)

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"tdm.num_steps must be >= 1, got {self.num_steps}")
        if self.interval not in INTERVALS:
            raise ValueError(f"tdm.interval must be one of {INTERVALS}, got {self.interval!r}")
        if self.importance_weight not in IMPORTANCE_WEIGHTS:
            raise ValueError(f"tdm.importance_weight must be one of {IMPORTANCE_WEIGHTS}, "
                             f"got {self.importance_weight!r}")
        if self.generator_loss not in GENERATOR_LOSSES:
            raise ValueError(f"tdm.generator_loss must be one of {GENERATOR_LOSSES}, got {self.generator_loss!r}")
        if self.timesteps is None and not 1 <= self.num_steps <= self.total_steps:
            raise ValueError(f"tdm.num_steps must be <= tdm.total_steps ({self.total_steps}), got {self.num_steps}")
        if self.guidance_scale < 0 or self.snr_clamp <= 0 or self.huber_c <= 0:
            raise ValueError("tdm.guidance_scale must be >= 0 and tdm.snr_clamp, tdm.huber_c > 0")
        if self.diffuse_from not in DIFFUSE_FROM:
            raise ValueError(f"tdm.diffuse_from must be one of {DIFFUSE_FROM}, got {self.diffuse_from!r}")
        if any(not 1 <= k <= min(self.total_steps, MAX_STEPS) for k in self.num_steps_set):
            raise ValueError(f"tdm.num_steps_set entries must lie in [1, {min(self.total_steps, MAX_STEPS)}], "
                             f"got {list(self.num_steps_set)}")
        if self.num_steps_set and self.timesteps is not None:
            raise ValueError("tdm.num_steps_set draws K per iteration on the uniform grid; "
                             "it cannot be combined with an explicit tdm.timesteps")
        if self.timesteps is not None and len(self.timesteps) != self.num_steps:
            raise ValueError(f"tdm.timesteps has {len(self.timesteps)} entries but tdm.num_steps is {self.num_steps}")
        if self.timesteps is not None and not all(a > b > 0 for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ValueError(f"tdm.timesteps must strictly decrease and stay > 0, got {list(self.timesteps)}")

    @property
    def step_conditioned(self) -> bool:
        """Whether student and fake score take the number of steps (and the fake the step index) as input."""
        return bool(self.num_steps_set) or self.fake_step_condition

    @property
    def training_num_steps(self) -> tuple[int, ...]:
        """The step counts K the student trains at."""
        return tuple(sorted(set(self.num_steps_set))) or (self.num_steps,)


def step_inputs(config: TDMConfig, role: str) -> tuple[str, ...]:
    """The step inputs `role` is given: K to student and fake score under TDM-unify (tdm.num_steps_set), the
    step index k to the fake score when it is step-aware (tdm.fake_step_condition)."""
    if role not in (STUDENT, FAKE_SCORE):
        raise ValueError(f"role must be {STUDENT!r} or {FAKE_SCORE!r}, got {role!r}")
    takes_k = bool(config.num_steps_set)
    takes_index = config.fake_step_condition and role == FAKE_SCORE
    return (NUM_STEPS,) * takes_k + (STEP_INDEX,) * takes_index


def bind_steps(model: Model, config: TDMConfig, num_steps: int, step_index: Tensor | None = None) -> Model:
    """`model` sampling with K = num_steps, as a plain `(x_t, t, cond)` callable, given the step inputs of its
    role (`step_inputs`): `step_index` (the per-sample k) is passed for the fake score, None for the student.
    `model` itself when there is nothing to pass."""
    inputs = step_inputs(config, STUDENT if step_index is None else FAKE_SCORE)
    num_steps = num_steps if NUM_STEPS in inputs else None
    step_index = step_index if STEP_INDEX in inputs else None
    if num_steps is None and step_index is None:
        return model

    def bound(x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        ks = None if num_steps is None else torch.full((x_t.shape[0],), num_steps, device=x_t.device)
        return model(x_t, t, cond, num_steps=ks, step_index=step_index)

    return bound


def make_grid(config: TDMConfig, schedule: Schedule, num_steps: int | None = None) -> StudentGrid:
    """The student grid a config asks for: explicit list, official uniform VP grid, or shifted flow grid.

    `num_steps` other than the config's (sampling a fixed-K student at another K) gives the uniform grid.
    """
    K = num_steps or config.num_steps
    if config.timesteps is not None and K == len(config.timesteps):
        return explicit_grid(list(config.timesteps))
    if schedule.discrete:
        return uniform_grid(min(config.total_steps, schedule.num_train_timesteps), K)
    return flow_grid(K, schedule.num_train_timesteps)


@dataclass
class Draws:
    """Per-sample random choices of one phase (method.md C.1-C.4) at the iteration's K; every field is [B] except
    `noise` and `num_steps`."""

    k: Tensor        # step index in 1..K
    t_k: Tensor      # the student's level at step k
    t_mid: Tensor    # trajectory point the sample is diffused from
    tau: Tensor      # level the fake score and teacher are queried at
    noise: Tensor    # z of the forward kernel q(x_tau | x_mid), [B, ...]
    num_steps: int   # K, the student grid the draws are on


class TDM:
    def __init__(self, schedule: Schedule, prediction: PredictionType, config: TDMConfig,
                 guidance_rule: GuidanceRule = linear_guidance):
        if terminal_x0_undefined(schedule, prediction):
            raise ValueError("an epsilon-prediction teacher on a schedule with zero terminal SNR (alpha = 0 at the "
                             "noisiest level) has no x0 there (NaN): use a v_prediction teacher, or a schedule "
                             "without zero terminal SNR")
        self.schedule, self.prediction, self.config = schedule, prediction, config
        self.guidance_rule = guidance_rule  # the teacher's CFG (Backbone.guidance_rule)
        self.grids = {K: make_grid(config, schedule, K) for K in config.training_num_steps}
        self.grid = self.grids[config.training_num_steps[-1]]  # the default sampling grid (largest trained K)

    # ---- randomness: all draws vectorised over the batch ----
    def draw_num_steps(self, generator: torch.Generator) -> int:
        """K of this iteration: uniform over tdm.num_steps_set (TDM-unify), else the fixed K (no draw)."""
        choices = self.config.training_num_steps
        if len(choices) == 1:
            return choices[0]
        return choices[int(torch.randint(len(choices), (1,), generator=generator))]

    def draw(self, sample_shape: tuple[int, ...], generator: torch.Generator, device=None,
             num_steps: int | None = None) -> Draws:
        cfg, snap = self.config, self.schedule.snap
        grid = self.grids[num_steps or self.grid.num_steps]
        batch = sample_shape[0]
        u = torch.rand(3, batch, generator=generator, dtype=torch.float64)
        k = 1 + (u[0] * grid.num_steps).long().clamp(max=grid.num_steps - 1)
        t_k, t_mid = grid.level(k), grid.level(k, "lower")
        if cfg.randmid:
            t_mid = t_mid + (t_k - cfg.randmid_margin - t_mid).clamp_min(0) * u[1]
            t_mid = snap(t_mid).double()
        top = t_k if cfg.interval == "separate" else torch.full_like(t_k, grid.timesteps[0])
        lo = t_mid.clamp_min(cfg.tau_min)
        hi = torch.maximum(top - cfg.tau_margin, lo + 1)
        tau = lo + (hi - lo) * u[2]
        noise = torch.randn(sample_shape, generator=generator)
        return Draws(*(v.to(device) for v in (k, snap(t_k), snap(t_mid), snap(tau), noise)), grid.num_steps)

    def draw_iteration(self, sample_shape: tuple[int, ...], generator: torch.Generator, device,
                       fake_updates: int) -> tuple[list[Draws], Draws]:
        """One iteration's draws, in this order: K (TDM-unify), then the draws of each of `fake_updates` fake
        updates and those of the generator update, all at that K."""
        K = self.draw_num_steps(generator)
        fake = [self.draw(sample_shape, generator, device, K) for _ in range(fake_updates)]
        return fake, self.draw(sample_shape, generator, device, K)

    @staticmethod
    def stop_levels(fake_draws: list[Draws], generator_draws: Draws | None = None,
                    generator_step: bool = True) -> Tensor:
        """Per sample, the lowest level its rollout evaluates: every fake k (x0, eps there), and the generator's k
        when the rollout takes the generator's student step, else k + 1 (only the state at k is needed)."""
        stop = torch.stack([d.k for d in fake_draws]).amin(0)
        if generator_draws is None:
            return stop
        k_g = generator_draws.k if generator_step else (generator_draws.k + 1).clamp(max=generator_draws.num_steps)
        return torch.minimum(stop, k_g)

    @torch.no_grad()
    def student_trajectory(self, student: Model, noise: Tensor, cond: Cond, stop_level: int,
                           num_steps: int | None = None) -> Trajectory:
        """The student's rollout of the whole batch at K = num_steps (default: the largest trained K) down to
        `stop_level`."""
        grid = self.grids[num_steps or self.grid.num_steps]
        return rollout(bind_steps(student, self.config, grid.num_steps), noise, cond, grid, self.schedule,
                       self.prediction, stop_level=min(stop_level, grid.num_steps), return_trajectory=True)

    def rollout_for(self, student: Model, noise: Tensor, cond: Cond, fake_draws: list[Draws],
                    generator_draws: Draws | None = None, generator_step: bool = True,
                    any_left: Callable[[Tensor], bool] | None = None) -> Trajectory:
        """The rollout these draws need, at their K, each sample only as deep as its own draws (`stop_levels`).

        With generator draws and `generator_step`, each sample's forward at its generator level carries gradient
        and is the generator loss's one differentiable student step (`Trajectory.generator_step`): no student
        forward is computed twice. Without, the rollout takes no gradient and the generator loss recomputes that
        forward (less memory held across the fake-score update, one forward more per sample at most).
        `any_left`: see `rollout_per_sample` (sharded training)."""
        grid = self.grids[fake_draws[0].num_steps]
        take_step = generator_step and generator_draws is not None
        stop = self.stop_levels(fake_draws, generator_draws, generator_step)
        return rollout_per_sample(bind_steps(student, self.config, grid.num_steps), noise, cond, grid,
                                  self.schedule, self.prediction, stop, generator_draws.k if take_step else None,
                                  any_left)

    # ---- shared by both phases: trajectory point -> diffused sample (method.md C.6-C.8) ----
    def _diffuse(self, x0: Tensor, eps: Tensor, d: Draws) -> tuple[Tensor, Tensor]:
        """x_tau ~ q(x_tau | x_mid) with x_mid the student's DDIM step to t_mid, and the mixed noise n_mix with
        x_tau = alpha(tau) x0 + sigma(tau) n_mix. With diffuse_from = clean, x_tau ~ q(x_tau | x0) (n_mix = z)."""
        s = self.schedule
        if self.config.diffuse_from == "clean":
            return s.add_noise(x0, d.noise, d.tau), d.noise
        x_mid = s.ddim_step(x0, eps, d.t_mid)
        a, b = (append_dims(c, x0.ndim) for c in s.transition_coefficients(d.t_mid, d.tau))
        x_tau = a * x_mid + b * d.noise
        sig_mid, sig_tau = append_dims(s.sigma(d.t_mid), x0.ndim), append_dims(s.sigma(d.tau), x0.ndim)
        mixed_noise = (a * sig_mid * eps + b * d.noise) / sig_tau
        return x_tau, mixed_noise

    # ---- fake-score phase (method.md C) ----
    def fake_score_loss(self, fake: Model, traj: Trajectory, d: Draws, cond: Cond):
        cfg = self.config
        x0, eps = traj.gather("x0", d.k), traj.gather("eps", d.k)  # cached: no student call here
        x_tau, mixed_noise = self._diffuse(x0, eps, d)
        w = importance_weight(mixed_noise, d.noise, cfg.importance_weight, cfg.importance_clip)
        fake = bind_steps(fake, cfg, d.num_steps, d.k)
        fake_x0 = to_x0(fake(x_tau, d.tau, cond), x_tau, d.tau, self.schedule, self.prediction)
        return fake_score_loss(fake_x0, x0, self.schedule.snr(d.tau), w, cfg.snr_clamp)

    # ---- generator phase (method.md D) ----
    def generator_loss(self, student: Model, teacher: Model, fake: Model, traj: Trajectory, d: Draws,
                       cond: Cond, uncond: Cond):
        fake = bind_steps(fake, self.config, d.num_steps, d.k)
        # The only backprop path: one student step from the rollout state (paper Sec. 3.2), taken in the rollout
        # (`rollout_for`) or computed here.
        if traj.generator_step is not None:
            x0, eps = traj.generator_step
        else:
            x_k, student = traj.gather("states", d.k), bind_steps(student, self.config, d.num_steps)
            x0, eps = to_x0_eps(student(x_k, d.t_k, cond), x_k, d.t_k, self.schedule, self.prediction)
        with torch.no_grad():
            x_tau, _ = self._diffuse(x0, eps, d)
            teacher_out = guided(teacher, uncond, self.config.guidance_scale, self.guidance_rule)(x_tau, d.tau, cond)
            teacher_x0 = to_x0(teacher_out, x_tau, d.tau, self.schedule, self.prediction)
            fake_x0 = to_x0(fake(x_tau, d.tau, cond), x_tau, d.tau, self.schedule, self.prediction)
        return generator_loss(x0, teacher_x0, fake_x0, self.config.generator_loss, self.config.huber_c)
