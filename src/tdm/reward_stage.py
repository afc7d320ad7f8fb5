"""Reward post-training of a distilled student (TDM-R1, docs/reward.md): the trainer with a third role.

`RewardTrainer` is the distillation `Trainer` with one more trainable role, the surrogate reward model
`reward_model` (a third LoRA adapter on the shared base, or a trainable copy of the teacher), its own optimiser,
and another iteration (docs/reward.md 3.3):

    1  P conditions, each repeated G times (reward.group_size), independent noise
    2  the student's full rollout (no grad); the reward of its decoded samples (non-differentiable)
    3  group advantages (eq. A)
    4  fake-score update: TDM's fake_score_loss on the rollout
    5  surrogate update: the group preference loss on the rollout's states diffused with group-shared noise (S1-S5)
    6  generator update: TDM's generator_loss (the regulariser) + reward.weight x the reward term (G3), both from
       one student forward with gradient
    7  EMA of the student; lr schedules step

Everything else (accelerate, checkpoints of all three roles and their optimisers, bit-exact resume, evaluation,
trackers, the export layout) is the trainer's. Every draw of iteration n comes from `step_generator(seed, rank,
n)`, so a resumed run replays it.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .backbones.base import Backbone
from .checkpoint import load_checkpoint
from .config import Config
from .core.prediction import from_x0_eps, to_x0_eps
from .core.reward import (
    conditional_score_target,
    group_advantages,
    group_preference_loss,
    reward_generator_loss,
    trust_region_mask,
)
from .core.sampling import cond_to, guided, map_cond
from .errors import ConfigError
from .metrics import frechet_distance
from .rewards import load_reward, score
from .roles import REWARD_MODEL
from .runs import Run
from .trainer import RoleSpec, Trainer, draw_rows, mean_logs, step_generator

REWARD_OPTIMIZER = "reward_model"  # the surrogate optimiser's checkpoint files and lr schedule
TAU_MARGIN = 20.0  # tau starts this far above the trajectory state's level (the code's +20 on the time axis)


def check_reward_config(config: Config) -> None:
    """What the reward stage needs of a config, as one-line errors naming the field."""
    r, t = config.reward, config.train
    if not r.name:
        raise ConfigError("reward.name: give the reward to post-train against (tdm reward --reward NAME)")
    if t.batch_size % r.group_size:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of reward.group_size "
                          f"({r.group_size}): a group never spans two batches")
    if t.gradient_accumulation_steps != 1:
        raise ConfigError("train.gradient_accumulation_steps: the reward stage updates from one batch (1)")
    if config.tdm.num_steps_set:
        raise ConfigError("tdm.num_steps_set: the reward stage post-trains a fixed-K student")


class RewardTrainer(Trainer):
    stage = "reward"

    def __init__(self, config: Config, out_dir: str | Path, start: Run | None = None,
                 backbone: Backbone | None = None):
        """`start`: the distillation run (or checkpoint) whose student (its EMA when kept) and fake score the stage
        starts from; None starts from the backbone's initial weights (tests)."""
        check_reward_config(config)
        self.reward = load_reward(config.reward.name, **config.reward.reward_options())
        super().__init__(config, out_dir, backbone)
        if self.sharded:  # tdm.sharding shards the distillation roles only
            raise ConfigError("the reward stage does not train under FSDP yet: launch it with DDP (no accelerate "
                              "fsdp_config) or in one process")
        if start is not None:
            self._load_start(start)
        self._fd_warned = False  # the reward-hacking warning is given once

    # ---- the third role ----
    def _role_specs(self) -> dict[str, RoleSpec]:
        r = self.config.reward
        return {**super()._role_specs(), REWARD_MODEL: RoleSpec(REWARD_OPTIMIZER, r.lr, r.max_grad_norm)}

    def _role_module(self, name: str) -> torch.nn.Module:
        return self.roles.add_reward_model() if name == REWARD_MODEL else super()._role_module(name)

    @property
    def reward_model(self) -> torch.nn.Module:
        return self.modules[REWARD_MODEL]

    def _load_start(self, start: Run) -> None:
        """The start run's sampled student into the student (and its EMA), its fake score into the fake score."""
        unwrap = self.accelerator.unwrap_model
        student = unwrap(self.student)
        load_checkpoint(start.checkpoint, {start.sampled_weights: student}, {}, self.roles.base_fingerprint)
        load_checkpoint(start.checkpoint, {"fake_score": unwrap(self.fake_score)}, {}, self.roles.base_fingerprint)
        if self.ema is not None:
            self.ema.load_state_dict(student.state_dict())

    # ---- one iteration ----
    def train_step(self) -> dict:
        cfg, r = self.config, self.config.reward
        acc = self.accelerator
        g = step_generator(cfg.train.seed, acc.process_index, self.state.step)
        B, G = cfg.train.batch_size, r.group_size
        cond, prompts = self.backbone.sample_prompted_conditions(B // G, g)
        cond = cond_to(map_cond(lambda v: v.repeat_interleave(G, 0), cond), acc.device)
        prompts = prompts and [p for p in prompts for _ in range(G)]
        group = torch.arange(B // G, device=acc.device).repeat_interleave(G)
        noise = torch.randn((B, *self.backbone.sample_shape), generator=g).to(acc.device)
        uncond = cond_to(self.backbone.null_condition(B), acc.device)
        K = self.tdm.draw_num_steps(g)
        fake_draws = self.tdm.draw(noise.shape, g, acc.device, K)
        gen_draws = self.tdm.draw(noise.shape, g, acc.device, K)
        surrogate_draws = self._surrogate_draws(noise.shape, g, K)
        reward_noise = torch.randn((B // G, *noise.shape[1:]), generator=g).repeat_interleave(G, 0).to(acc.device)
        reward_tau = self._draw_tau(gen_draws.k, K, r.tau_min, g)

        with acc.autocast():
            traj = self.tdm.student_trajectory(self.student, noise, cond, 1, K)
        rewards = score(self.reward, self.backbone.to_images(traj.x0[1]), cond, prompts, r.name).to(acc.device)
        all_rewards = acc.gather(rewards)
        advantages = group_advantages(rewards, group, r.advantage_std, r.advantage_clip,
                                      global_std=all_rewards.std(unbiased=False))
        micro = [(slice(0, B), cond, traj)]

        logs = self.fake_score_step(micro, fake_draws)
        logs.update(self.reward_model_step(micro, surrogate_draws, group, advantages))
        logs.update(self.reward_generator_step(micro, gen_draws, uncond, reward_tau, reward_noise, K))
        logs.update({"reward/mean": all_rewards.mean(), "reward/std": all_rewards.std(unbiased=False),
                     "reward/groups_without_signal": self._flat_groups(rewards, group)})
        return self._end_iteration(logs)

    @staticmethod
    def _flat_groups(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """The fraction of groups whose rewards are all equal: they give no advantage."""
        spread = [float(rewards[group == j].max() - rewards[group == j].min()) for j in group.unique().tolist()]
        return torch.tensor(sum(s == 0 for s in spread) / len(spread))

    def _draw_tau(self, k: torch.Tensor, K: int, floor: float, g: torch.Generator) -> torch.Tensor:
        """A level tau per sample, uniform from TAU_MARGIN above both the level after step k (t_{k-1}, 0 after the
        last step) and `floor`, up to reward.tau_max or the grid's noisiest level t_K, but always above that start
        (docs/reward.md S1, without the code's timestep shift): tau > t_{k-1}, so the kernel adds noise."""
        grid, s = self.tdm.grids[K], self.backbone.schedule
        lo = torch.clamp(self._level_after(k, K).double(), min=floor) + TAU_MARGIN
        hi = torch.maximum(torch.full_like(lo, min(float(grid.timesteps[0]), self.config.reward.tau_max)), lo + 1)
        u = torch.rand(k.shape[0], generator=g, dtype=torch.float64).to(k.device)
        tau = s.snap(lo + (hi - lo) * u)
        return tau if s.discrete else tau.float()

    def _level_after(self, k: torch.Tensor, K: int) -> torch.Tensor:
        """t_{k-1}: the level of the state after student step k (0 after the last)."""
        grid = self.tdm.grids[K]
        return torch.where(k > 1, grid.level((k - 1).clamp(min=1)), torch.zeros_like(k, dtype=torch.float64))

    def _surrogate_draws(self, shape: tuple, g: torch.Generator, K: int) -> dict:
        """The surrogate's step k' (drawn with weight K - k' + 1: cleaner steps more often), its level tau above
        reward.tau_min_surrogate and the group-shared noise z (docs/reward.md S1-S2)."""
        B, G = shape[0], self.config.reward.group_size
        weights = torch.arange(K, 0, -1, dtype=torch.float64)  # k' = 1..K -> K..1
        k = 1 + torch.multinomial(weights, B, replacement=True, generator=g)
        k = k.to(self.accelerator.device)
        tau = self._draw_tau(k, K, self.config.reward.tau_min_surrogate, g)
        z = torch.randn((B // G, *shape[1:]), generator=g).repeat_interleave(G, 0).to(self.accelerator.device)
        return {"k": k, "tau": tau, "noise": z, "weight": (K - k + 1).float() / K}

    def _state_after(self, traj, k: torch.Tensor, K: int) -> torch.Tensor:
        """Per sample, the rollout's state after student step k: x_{t_{k-1}}, the final sample after the last."""
        states = {j: traj.states[j] for j in range(1, K)}
        states[0] = traj.x0[1]
        stacked = torch.stack([states[j] for j in range(K)])
        return stacked[(k - 1).long(), torch.arange(k.numel(), device=k.device)]

    def reward_model_step(self, micro: list[tuple], draws: dict, group: torch.Tensor,
                          advantages: torch.Tensor) -> dict:
        """One surrogate update: the group preference loss of its denoising losses against the base's on the
        rollout's states (docs/reward.md S3-S5), plus reward.beta x its drift from the base."""
        r, s, prediction = self.config.reward, self.backbone.schedule, self.backbone.prediction
        K = self.tdm.grid.num_steps

        def loss_of(rows, cond, traj):
            k, tau, z = draws["k"][rows], draws["tau"][rows], draws["noise"][rows]
            x_from = self._state_after(traj, k, K)
            x_tau, x0, eps = conditional_score_target(x_from, self._level_after(k, K), tau, z, s)
            target = from_x0_eps(x0, eps, tau, s, prediction)
            out = self.reward_model(x_tau, tau, cond).float()
            with torch.no_grad():
                out_ref = self.teacher(x_tau, tau, cond).float()
            dsm = (out - target).flatten(1).pow(2).mean(1)
            dsm_ref = (out_ref - target).flatten(1).pow(2).mean(1)
            drift = (out - out_ref).flatten(1).pow(2).mean(1)
            a = advantages[rows]
            frozen = None
            if r.drift_threshold > 0:
                frozen = trust_region_mask(dsm, dsm_ref, a, 0.0) & (drift.detach() > r.drift_threshold)
            pref, logs = group_preference_loss(dsm, dsm_ref, a, group[rows], r.beta_dpo, frozen)
            logs["reward_model/drift"] = drift.detach().mean()
            return draws["weight"][rows] * pref + r.beta * drift, logs

        loss, logs, grad_norm, _ = self.role_update(REWARD_MODEL, micro, loss_of)
        return {"reward_model/loss": loss.mean(), "reward_model/grad_norm": grad_norm, **mean_logs(logs)}

    def reward_generator_step(self, micro: list[tuple], draws, uncond, reward_tau: torch.Tensor,
                              reward_noise: torch.Tensor, K: int) -> dict:
        """One generator update: reward.regulariser_weight x TDM's generator loss + reward.weight x the reward term
        (docs/reward.md G1-G3) on steps k > K - reward.trunc_steps, from one student forward with gradient."""
        r, s, prediction = self.config.reward, self.backbone.schedule, self.backbone.prediction
        teacher, fake = self._frozen_signal()
        surrogate = guided(self.reward_model, uncond, r.guidance, self.backbone.guidance_rule)

        def loss_of(rows, cond, traj):
            d = draw_rows(draws, rows)
            x_k = traj.gather("states", d.k)
            x0, eps = to_x0_eps(self.student(x_k, d.t_k, cond), x_k, d.t_k, s, prediction)
            regulariser, logs = self.tdm.generator_loss(self.student, teacher, fake,
                                                        dataclasses.replace(traj, generator_step=(x0, eps)), d, cond,
                                                        map_cond(lambda v: v[rows], uncond))
            tau, z = reward_tau[rows], reward_noise[rows]
            with torch.no_grad():
                t_next = self._level_after(d.k, K)
                x_next = s.ddim_step(x0.detach(), eps.detach(), t_next)
                x_tau = conditional_score_target(x_next, t_next, tau, z, s)[0]  # q(x_tau | x_next), eq. G2
                surrogate_x0 = to_x0_eps(surrogate(x_tau, tau, cond), x_tau, tau, s, prediction)[0]
                reference_x0 = to_x0_eps(teacher(x_tau, tau, cond), x_tau, tau, s, prediction)[0]
            reward_term, reward_logs = reward_generator_loss(x0, surrogate_x0, reference_x0)
            on = (d.k > K - r.trunc_steps) if r.trunc_steps else torch.ones_like(d.k, dtype=torch.bool)
            loss = r.regulariser_weight * regulariser + r.weight * on.float() * reward_term
            return loss, {**logs, **reward_logs, "generator/regulariser": regulariser.detach().mean(),
                          "generator/reward_term": reward_term.detach().mean()}

        loss, logs, grad_norm, updated = self.role_update("student", micro, loss_of)
        if updated and self.ema is not None:
            self._update_ema()
        return {"generator/loss": loss.mean(), "generator/grad_norm": grad_norm, **mean_logs(logs)}

    # ---- evaluation and the safeguard ----
    def _stage_metrics(self, samples: torch.Tensor, cond) -> dict:
        """The reward's mean and spread on the evaluation samples and their FD to the teacher's reference samples
        (eval.teacher_steps[0] steps, in the backbone's features): the trade-off a user watches."""
        prompts = self.backbone.evaluation_prompts(samples.shape[0])  # the text of the evaluation conditions
        scores = score(self.reward, self.backbone.to_images(samples), cond, prompts, self.config.reward.name)
        fd = frechet_distance(self.backbone.features(samples), self.backbone.features(self._teacher_reference()))
        return {"eval/reward_mean": float(scores.mean()), "eval/reward_std": float(scores.std(unbiased=False)),
                "eval/fd_teacher": fd}

    def evaluate_now(self) -> dict:
        """An evaluation outside the loop (the starting student's, before the first iteration), logged."""
        logs = self._evaluate(self.trackers)
        self._log(self.trackers, logs)
        self._warn(self.trackers, logs)
        return logs

    def _warn(self, trackers, logs: dict):
        super()._warn(trackers, logs)
        if "eval/reward_mean" not in logs or self._fd_warned:
            return
        first = next(h for h in self.history if "eval/reward_mean" in h)  # the starting student's (history holds
        bound = self.config.reward.fd_bound or 2 * first["eval/fd_teacher"]  # these logs already)
        if logs["eval/reward_mean"] > first["eval/reward_mean"] and logs["eval/fd_teacher"] > bound:
            self._fd_warned = True
            message = (f"iteration {self.state.step}: reward hacking? the reward rose "
                       f"({first['eval/reward_mean']:.3g} -> {logs['eval/reward_mean']:.3g}) while FD to "
                       f"the teacher's samples grew to {logs['eval/fd_teacher']:.3g} (> {bound:.3g}, reward.fd_bound)")
            self.diagnostics.warnings.append({"step": self.state.step, "condition": "reward hacking",
                                              "message": message})
            if trackers is not None:
                tqdm.write(f"tdm: warning: {message}", file=sys.stderr)
                trackers.text("warnings", message, self.state.step)
