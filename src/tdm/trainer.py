"""The training loop: accelerate, one optimiser and lr schedule per trainable role, gradient accumulation, EMA,
trackers, sample and validation grids, checkpoints, resume.

The roles come from `Roles.from_config` (train.roles): whichever the strategy, each optimiser, the gradient
clipping, the non-finite checks, the EMA and the checkpoint see only that role's trainable weights. The trainable
roles live in role-keyed tables (`role_specs`: optimiser name, lr, clipping; `modules`; `optimizers`) from which the
prepared objects, the lr schedules and the checkpoint's module and optimiser dicts are built, and every role trains
through one update (`role_update`): a stage with another role (tdm.reward_stage) adds a table entry, not a phase.

Runs under plain `python` (one process) and under `accelerate launch` / `torchrun` (DDP), or FSDP2 when launched
with an accelerate FSDP config (tdm.sharding shards the roles; checkpoints hold full tensors); tdm.launch says which
mixed precision applies and refuses a launch that started fewer processes than it asked for. Randomness of
step n on rank r comes from a generator seeded with (seed, r, n), so a resumed run replays the same draws.

Gradient accumulation (train.gradient_accumulation_steps = M): an iteration draws conditions, noise and TDM draws
for M x batch_size samples exactly as one batch of that size would, and splits them into M micro-batches. The
fake score accumulates its gradient over all M (each loss scaled by 1/M) and steps once; then the generator does
the same against the updated fake score. So an iteration with M micro-batches of B computes what one of M x B
does, up to the order of floating-point sums, and updates each role once: accelerate's `accumulate` counts
micro-batches for one optimiser and cannot order two roles in one iteration, so the loop does it with
`Accelerator.no_sync` on every micro-batch but the last. With M > 1 the generator's student forward is
recomputed per micro-batch after the fake update (train.generator_forward=recompute): holding M rollout graphs
would cost the memory accumulation saves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from PIL import Image
from tqdm.auto import tqdm

from . import collectives, sharding
from .backbones.base import Backbone
from .checkpoint import load_checkpoint, prune_checkpoints, read_manifest, save_checkpoint
from .config import Config, to_dict
from .core.algorithm import TDM, Draws
from .core.sampling import cond_to, map_cond
from .cpu_threads import thread_budget
from .diagnostics import Diagnostics, per_step_losses, sample_statistics
from .divergence import DivergenceWatch
from .errors import TrainingAborted
from .files import atomic_write, write_text_atomic
from .launch import check_process_count, mixed_precision
from .meta_init import denoiser_on_meta
from .optimizers import FAKE_SCORE, GENERATOR, build_lr_scheduler, build_optimizer, check_optimizer_packages
from .preemption import StopSignals
from .registry import build_backbone, check_backbone_matches, check_training_inputs
from .report import image_grid
from .resume import load_newest, no_usable_checkpoint, set_aside
from .roles import Roles, require_compiler
from .samplers import draw_samples, student_samplers, teacher_samplers
from .tracking import Trackers, tracker_names
from .train_state import TrainState
from .validation import check_validation, validation_conditions, validation_grid


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A CPU generator for (seed, rank, step), independent across all three."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))  # manual_seed takes < 2**63


def autocast_off(model: torch.nn.Module):
    """`model` called with autocast disabled (train.fp32_signal): float32 weights compute in float32. accelerate
    runs a prepared model's forward under its own autocast; its `_original_forward` is the forward without."""
    forward = getattr(model, "_original_forward", model)

    def call(x_t: torch.Tensor, t: torch.Tensor, cond, **kwargs):
        with torch.autocast(x_t.device.type, enabled=False):
            return forward(x_t.float(), t, cond, **kwargs)

    return call


def draw_rows(draws: Draws, rows: slice) -> Draws:
    """The draws of a micro-batch: `rows` of every per-sample field."""
    return dataclasses.replace(draws, **{f.name: getattr(draws, f.name)[rows] for f in dataclasses.fields(draws)
                                         if f.name != "num_steps"})


def mean_logs(logs: list[dict]) -> dict:
    """Per key, the mean over micro-batches of their logged means."""
    return {k: torch.stack([torch.as_tensor(log[k]) for log in logs]).mean() for k in logs[0]}


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Mean of `params`' gradients over all ranks, in one all-reduce. A parameter may have a gradient on some ranks
    only (Wan 2.2's second expert runs only on samples below its boundary): it counts as zero where it has none,
    as in DDP, and keeps no gradient where no rank has one."""
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([*(g.reshape(-1).float() for g in grads), present])
    torch.distributed.all_reduce(flat)
    *means, anywhere = flat.split([*(g.numel() for g in grads), len(params)])
    for p, g, mean, used in zip(params, grads, means, anywhere.bool().tolist()):
        if used:
            p.grad = (mean / world_size).view_as(p).to(g.dtype)

@dataclasses.dataclass(frozen=True)
class RoleSpec:
    """How a trainable role trains: its optimiser's name (checkpoint files, lr schedule), lr and gradient clipping."""

    optimizer: str
    lr: float
    max_grad_norm: float  # 0: no clipping


class Trainer:
    stage = "distill"  # the progress bar's label

    def __init__(self, config: Config, out_dir: str | Path, backbone: Backbone | None = None):
        """`backbone`: an already built `config.backbone` (benchmarks reuse one across runs); None builds it."""
        if backbone is None:
            check_training_inputs(config.backbone)  # before loading anything
        else:
            check_backbone_matches(config.backbone, backbone)  # the saved config must rebuild it
        self.config, self.out_dir = config, Path(out_dir)
        trackers = tracker_names(config.train.report_to)  # a missing tracker package stops the run here,
        check_optimizer_packages(config.optim)             # as does a missing optimiser or schedule package
        fsdp = sharding.launch_settings()  # an accelerate FSDP config: tdm.sharding shards the roles
        # DDP without a buffer broadcast at each forward: the rollout calls the student per level on the samples
        # still running it, so ranks make different numbers of calls (the networks' buffers are constants).
        with sharding.accelerate_without_fsdp():  # sharding is tdm's, not accelerate's
            self.accelerator = Accelerator(mixed_precision=mixed_precision(config.train.mixed_precision),
                                           cpu=not torch.cuda.is_available(),  # gloo DDP on CPU-only machines
                                           kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        check_process_count(self.accelerator.num_processes)  # before loading anything
        self.sharded = fsdp is not None and self.accelerator.num_processes > 1
        if self.sharded:
            sharding.check_config(config, self.accelerator.mixed_precision, fsdp)
        self.trackers = Trackers(self.accelerator, trackers, self.out_dir, to_dict(config)) \
            if self.accelerator.is_main_process else None
        on_cpu = self.accelerator.device.type == "cpu"
        self.thread_budget = thread_budget(config.train.threads) if on_cpu else None  # before any network runs
        if config.train.compile:
            require_compiler(self.accelerator.device)  # before loading anything
        # fsdp_cpu_ram_efficient_loading: rank 0 loads the weights, the others build the network to shard on meta
        from_rank0 = self.sharded and fsdp.from_rank0
        with denoiser_on_meta(from_rank0 and backbone is None and not self.accelerator.is_main_process):
            self.backbone = backbone or build_backbone(config.backbone)
        check_validation(self.backbone, config.train.validation_every, config.train.validation_prompts)
        self.tdm = TDM(self.backbone.schedule, self.backbone.prediction, config.tdm, self.backbone.guidance_rule)
        self.roles = roles = Roles.from_config(config, self.backbone)
        if not from_rank0:  # else fully_shard moves rank 0's networks to the device unit by unit, as shards
            roles.to(self.accelerator.device)
        self.teacher = roles.teacher
        self.ema = roles.student_ema() if config.train.ema_decay > 0 else None
        if config.train.compile:  # after the EMA copy: only the networks training calls are compiled
            roles.compile()
        if self.sharded:  # before the optimisers, which then hold the shards
            sharding.shard_roles(roles, self.ema, fsdp, self.accelerator.mixed_precision)
        self.role_specs = self._role_specs()
        self.modules = {name: self._role_module(name) for name in self.role_specs}
        optimizers = {name: build_optimizer(module.parameters(), self.role_specs[name].lr, config.optim,
                                            grad_scaler=self.accelerator.scaler is not None)
                      for name, module in self.modules.items()}
        if roles.shared is None and not self.sharded:
            prepared = self.accelerator.prepare(*self.modules.values(), *optimizers.values())
            self.modules = dict(zip(self.modules, prepared[:len(self.modules)]))
            self.optimizers = dict(zip(optimizers, prepared[len(self.modules):]))
        else:
            # The views are not DDP-wrapped. DDP finds parameters and buffers by walking module internals; a view
            # of a shared base is either the whole base (then each of two wrappers sees the other role's adapter
            # as unused and both broadcast the same buffers) or, as here, only its adapter through an overridden
            # named_parameters that DDP need not honour. Instead one all-reduce per role averages its gradients
            # after its backward (_average_gradients): explicit, and LoRA gradients are small, so DDP's overlap
            # of communication with the backward is not missed.
            # Sharded roles are not wrapped either: FSDP reduce-scatters their gradients in the backward.
            self.optimizers = dict(zip(optimizers, self.accelerator.prepare(*optimizers.values())))
        # the lr schedules drive the torch optimisers (after accelerate's fp16 patch of their step, so it is theirs)
        self._raw_optimizers = {spec.optimizer: self.optimizers[name].optimizer
                                for name, spec in self.role_specs.items()}
        self.state = TrainState(lr_schedule_steps=config.train.iterations).track(self.role_specs)  # checkpointed
        self.lr_schedulers = self._lr_schedulers(config.train.iterations)
        self.history: list[dict] = []  # logged scalars, for the end-of-run curves
        self.diagnostics = Diagnostics()  # drift and collapse warnings
        self._teacher_samples: torch.Tensor | None = None  # the diagnostics' reference, drawn at the first eval
        self.divergence = DivergenceWatch(config.train.max_nonfinite, verbose=self.accelerator.is_main_process)
        self.stopped_by: str | None = None  # the stop signal that ended train(), if any
        self._tic, self._tic_step = time.perf_counter(), 0  # start (time, step) of the current logging interval
        self._validation: tuple | None = None  # the validation grid's (conditions, prompts), made at its first use

    def _role_specs(self) -> dict[str, RoleSpec]:
        """The trainable roles, in the order their modules and optimisers are prepared and checkpointed."""
        o = self.config.optim
        return {"student": RoleSpec(GENERATOR, o.generator_lr, o.max_grad_norm),
                "fake_score": RoleSpec(FAKE_SCORE, o.fake_lr, 0.0)}

    def _role_module(self, name: str) -> torch.nn.Module:
        """Role `name`'s trainable module, from `self.roles`."""
        return getattr(self.roles, name)

    # the distillation roles by name (tests and benchmarks read them)
    student = property(lambda self: self.modules["student"])
    fake_score = property(lambda self: self.modules["fake_score"])
    opt_g = property(lambda self: self.optimizers["student"])
    opt_f = property(lambda self: self.optimizers["fake_score"])

    def _lr_schedulers(self, steps: int) -> dict:
        """Each optimiser's lr schedule over `steps` iterations (None: constant, no scheduler)."""
        return {role: build_lr_scheduler(opt, self.config.optim, role, steps)
                for role, opt in self._raw_optimizers.items()}

    def _restore_lr_schedules(self) -> None:
        """After a resume: the config's learning rates (--allow-config-change may change them) on schedules of the
        length of the run's first start, at the resumed step."""
        steps = self.state.lr_schedule_steps or self.config.train.iterations
        o = self.config.optim
        for spec in self.role_specs.values():
            for group in self._raw_optimizers[spec.optimizer].param_groups:  # a new schedule takes its base lr
                group["lr"] = group["initial_lr"] = spec.lr                  # from initial_lr
        self.lr_schedulers = self._lr_schedulers(steps)
        if steps != self.config.train.iterations and self.accelerator.is_main_process and o.lr_scheduler != "constant":
            print(f"tdm: note: the lr schedule keeps the length of the run's first start ({steps} iterations), "
                  f"not train.iterations={self.config.train.iterations}", file=sys.stderr)
        self.state.lr_schedule_steps = steps
        for scheduler in self.lr_schedulers.values():
            if scheduler is not None:
                scheduler.last_epoch = self.state.step - 1  # the next step sets the lr of iteration `step`,
        self._step_lr_schedules()                           # as the uninterrupted run computed it

    def _step_lr_schedules(self) -> None:
        """Advance both schedules by one iteration. They follow the iteration, not the optimiser's step, so
        torch's warnings about the order of the two (a skipped first update; accelerate swapping the step method
        under fp16) do not apply."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
            warnings.filterwarnings("ignore", r"Seems like `optimizer.step\(\)` has been overridden", UserWarning)
            for scheduler in self.lr_schedulers.values():
                if scheduler is not None:
                    scheduler.step()

    # ---- the parts of one iteration ----
    def _accumulate_gradients(self, module: torch.nn.Module, micro: list[tuple],
                              loss_of) -> tuple[torch.Tensor, list[dict]]:
        """`module`'s gradients of the mean of `loss_of(rows, cond, trajectory)` over the micro-batches `micro`
        [(rows, cond, trajectory)], all-reduced once, on the last (DDP) or after it (LoRA roles); returns the
        per-sample losses and each micro-batch's logs."""
        losses, logs = [], []
        for i, (rows, cond, traj) in enumerate(micro):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(module):
                with self.accelerator.autocast():
                    loss, log = loss_of(rows, cond, traj)
                self.accelerator.backward(loss.mean() / len(micro))
            losses.append(loss.detach())
            logs.append(log)
        self._average_gradients(module)
        return torch.cat(losses), logs

    def role_update(self, role: str, micro: list[tuple], loss_of) -> tuple[torch.Tensor, list[dict], torch.Tensor,
                                                                             bool]:
        """One update of `role`: zero its gradients, accumulate those of `loss_of(rows, cond, trajectory)` over the
        micro-batches `micro` (`_accumulate_gradients`), clip them to the role's max norm, check they are finite
        and step its optimiser. Returns the per-sample losses, each micro-batch's logs, the gradient norm (before
        clipping) and whether the weights changed."""
        module, opt, spec = self.modules[role], self.optimizers[role], self.role_specs[role]
        opt.zero_grad(set_to_none=True)
        loss, logs = self._accumulate_gradients(module, micro, loss_of)
        grad_norm = None
        if spec.max_grad_norm > 0:
            # Unscale (fp16) this optimiser's gradients only, as a plain fp16 loop does: accelerate's
            # clip_grad_norm_ unscales every optimiser's, and another role's stale overflowed gradients would
            # back the scale off a second time.
            self.accelerator.unscale_gradients(opt)
            grad_norm = sharding.full(torch.nn.utils.clip_grad_norm_(module.parameters(), spec.max_grad_norm))
        updated = self._update(role, module, opt, loss)
        if grad_norm is None:
            grad_norm = sharding.full(torch.nn.utils.get_total_norm([p.grad for p in module.parameters()
                                                                     if p.grad is not None]))
        return loss, logs, grad_norm, updated

    def fake_score_step(self, micro: list[tuple], draws: Draws) -> dict:
        """One fake-score update from the micro-batches `micro` [(rows, cond, trajectory)] with `draws`."""
        loss, logs, grad_norm, _ = self.role_update(
            "fake_score", micro,
            lambda rows, cond, traj: self.tdm.fake_score_loss(self.fake_score, traj, draw_rows(draws, rows), cond))
        return {"fake/loss": loss.mean(), "fake/grad_norm": grad_norm, **mean_logs(logs),
                **per_step_losses(loss, draws.k, "fake")}

    def generator_step(self, micro: list[tuple], draws: Draws, uncond) -> dict:
        """One generator update from the micro-batches `micro` [(rows, cond, trajectory)] with `draws`."""
        teacher, fake = self._frozen_signal()
        loss, logs, grad_norm, updated = self.role_update(
            "student", micro,
            lambda rows, cond, traj: self.tdm.generator_loss(self.student, teacher, fake, traj,
                                                             draw_rows(draws, rows), cond, uncond))
        if updated and self.ema is not None:
            self._update_ema()
        return {"generator/loss": loss.mean(), "generator/grad_norm": grad_norm, **mean_logs(logs),
                **per_step_losses(loss, draws.k, "generator")}

    def _frozen_signal(self) -> tuple:
        """Teacher and fake score as the generator's loss calls them: with train.fp32_signal, autocast off (no
        gradient flows through either, so the unwrapped fake score will do)."""
        teacher, fake = self.teacher, self.fake_score
        if self.config.train.fp32_signal:
            teacher, fake = autocast_off(teacher), autocast_off(self.accelerator.unwrap_model(fake))
        return teacher, fake

    def _average_gradients(self, module: torch.nn.Module) -> None:
        """Mean of a LoRA role's gradients over all ranks, in one all-reduce (what DDP does for wrapped roles, and
        FSDP's reduce-scatter for sharded ones)."""
        if self.roles.shared is None or self.accelerator.num_processes == 1 or self.sharded:
            return
        average_gradients(list(module.parameters()), self.accelerator.num_processes)

    def _update(self, role: str, module: torch.nn.Module, opt, loss: torch.Tensor) -> bool:
        """Step `role`'s optimiser unless its update is non-finite; True if its weights changed.

        Under fp16 with a grad scaler (accelerate on a GPU) the scaler judges the gradients, as in a plain fp16
        loop: `opt.step()` runs `scaler.step`, which skips an overflowing update, and `scaler.update`, which backs
        the scale off (skipping `opt.step()` would keep the scale too high forever). Only a non-finite loss then
        counts toward train.max_nonfinite; without a scaler, non-finite gradients count too."""
        scaler = self.accelerator.scaler
        finite = self._finite_update(role, module if scaler is None else None, loss)
        if scaler is None and not finite:
            return False
        with self.divergence.watch(role, opt, self.state.step):
            opt.step()
        overflow = scaler is not None and opt.step_was_skipped
        self.state.overflows[role] += overflow
        return not overflow

    def _finite_update(self, role: str, module: torch.nn.Module | None, loss: torch.Tensor) -> bool:
        """True if the loss and (all-reduced) gradients of `module` (None: the loss only) are finite; else count
        a skipped update for `role` and abort after `train.max_nonfinite` in a row. Gradients are synchronised,
        so all ranks agree; sharded, each rank checks its shards and its loss, and all take the verdict of all."""
        params = module.parameters() if module is not None else ()
        checks = [torch.isfinite(sharding.local(p.grad)).all() for p in params if p.grad is not None]
        state = self.state
        finite = torch.stack([*checks, torch.isfinite(loss).all()]).all()
        if collectives.all_ranks_true(finite) if self.sharded else bool(finite):  # one device sync
            state.nonfinite_in_a_row[role] = 0
            state.last_finite_loss[role] = float(loss.detach().mean())
            return True
        state.nonfinite_in_a_row[role] += 1
        state.skipped[role] += 1
        self.divergence.skipped()
        if self.accelerator.is_main_process:
            tqdm.write(f"tdm: warning: non-finite {role} loss or gradient at iteration {state.step}; update skipped",
                       file=sys.stderr)
        if state.nonfinite_in_a_row[role] >= self.config.train.max_nonfinite:
            last = state.divergence.last_good_checkpoint(self.out_dir / "checkpoints", state.step)
            began = state.divergence.began_by(state.step)
            raise TrainingAborted(
                f"{role}: {state.nonfinite_in_a_row[role]} non-finite updates in a row (train.max_nonfinite), "
                f"last at iteration {state.step}; last finite {role} loss: {state.last_finite_loss[role]}; "
                f"last good checkpoint (before the divergence that began at iteration {began}): {last or 'none'}")
        return False

    def train_step(self) -> dict:
        """One TDM iteration: draws, the student's rollout(s), fake-score update(s), then the generator update,
        each over train.gradient_accumulation_steps micro-batches; then both lr schedules step.

        The rollout the generator update differentiates from also feeds the first fake update. Further fake
        updates (optim.fake_updates > 1) reuse it, or with optim.fresh_fake_rollouts each rolls out new
        conditions and noise through the same student (DMD2's fresh samples; docs/fake_rollouts.md)."""
        cfg = self.config
        g = step_generator(cfg.train.seed, self.accelerator.process_index, self.state.step)
        cond, noise = self._batch(g)
        uncond = cond_to(self.backbone.null_condition(cfg.train.batch_size), self.accelerator.device)
        fake_draws, gen_draws = self.tdm.draw_iteration(noise.shape, g, noise.device, cfg.optim.fake_updates)
        fresh = cfg.optim.fresh_fake_rollouts
        micro = self._rollouts(noise, cond, fake_draws[:1] if fresh else fake_draws, gen_draws)
        logs = self.fake_score_step(micro, fake_draws[0])
        for d in fake_draws[1:]:
            if fresh:
                fresh_cond, fresh_noise = self._batch(g)
                logs = self.fake_score_step(self._rollouts(fresh_noise, fresh_cond, [d]), d)
            else:
                logs = self.fake_score_step(micro, d)
        logs.update(self.generator_step(micro, gen_draws, uncond))
        logs["train/num_steps"] = gen_draws.num_steps  # TDM-unify: this iteration's K
        return self._end_iteration(logs)

    def _end_iteration(self, logs: dict) -> dict:
        """After an iteration's updates (any stage): the lr schedules step (the lr of the next iteration, also after
        a skipped update), the fault counters join the logs, the step advances; returns the logs as floats."""
        self._step_lr_schedules()
        logs.update({f"skipped/{role}": n for role, n in self.state.skipped.items()})
        if self.accelerator.scaler is not None:
            logs.update({f"fp16/overflows_{role}": n for role, n in self.state.overflows.items()})
            logs["fp16/loss_scale"] = self.accelerator.scaler.get_scale()
        self.divergence.end_iteration(self.state.divergence, self.state.step)
        self.state.step += 1
        return {k: float(v) for k, v in logs.items()}

    def _batch(self, g: torch.Generator) -> tuple:
        """An iteration's conditions and initial noise (all its micro-batches), drawn with `g`, on the device."""
        t, device = self.config.train, self.accelerator.device
        batch = t.batch_size * t.gradient_accumulation_steps
        cond = cond_to(self.backbone.sample_conditions(batch, g), device)
        return cond, torch.randn((batch, *self.backbone.sample_shape), generator=g).to(device)

    def _rollouts(self, noise: torch.Tensor, cond, fake_draws: list, gen_draws=None) -> list[tuple]:
        """Per micro-batch (rows, cond, the current student's rollout from its noise that the draws need). With
        generator draws and one micro-batch the rollout also takes the generator's student step, with gradient,
        unless train.generator_forward=recompute."""
        t = self.config.train
        take_step = t.generator_forward == "rollout" and t.gradient_accumulation_steps == 1
        micro = []
        for start in range(0, noise.shape[0], t.batch_size):
            rows = slice(start, start + t.batch_size)
            part = map_cond(lambda v, rows=rows: v[rows], cond)
            with self.accelerator.autocast():
                traj = self.tdm.rollout_for(self.student, noise[rows], part, [draw_rows(d, rows) for d in fake_draws],
                                            gen_draws and draw_rows(gen_draws, rows), generator_step=take_step,
                                            any_left=collectives.any_rank if self.sharded else None)
            micro.append((rows, part, traj))
        return micro

    @torch.no_grad()
    def _update_ema(self):
        decay = self.config.train.ema_decay
        for e, p in zip(self.ema.parameters(), self.accelerator.unwrap_model(self.student).parameters()):
            e.lerp_(p.detach(), 1 - decay)

    # ---- sampling, evaluation, logging ----
    def student_for_sampling(self) -> torch.nn.Module:
        """The student to sample from: its EMA when one is kept, else the raw (unwrapped) weights."""
        return self.ema if self.ema is not None else self.accelerator.unwrap_model(self.student)

    def _evaluate(self, trackers: Trackers | None) -> dict:
        student = student_samplers(self.student_for_sampling(), self.config.tdm, self.backbone.schedule,
                                   [self.tdm.grid.num_steps])[0]
        samples, cond, _ = draw_samples(self.backbone, student, self.config.train.eval_samples,
                                        self.config.train.seed, device=self.accelerator.device)
        metrics = {f"eval/{k}": v for k, v in self.backbone.metrics(samples, cond).items()}
        metrics.update(sample_statistics(samples, self._teacher_reference()))
        metrics.update(self._stage_metrics(samples, cond))
        if trackers is not None and self.backbone.is_image:
            trackers.images({"eval/samples": image_grid(self.backbone.to_images(samples), nrow=10)}, self.state.step)
        return metrics

    def _stage_metrics(self, samples: torch.Tensor, cond) -> dict:
        """Further evaluation metrics of a training stage (the reward stage's reward and FD); none here."""
        return {}

    def _teacher_reference(self) -> torch.Tensor:
        """The reference teacher's samples (the first eval.teacher_steps, the run's CFG) on the evaluation conditions,
        drawn once with other seeds than the student's: what the drift and collapse diagnostics compare against."""
        if self._teacher_samples is None:
            cfg = self.config
            teacher = teacher_samplers(self.teacher, self.backbone.schedule, cfg.eval.teacher_steps[:1],
                                       cfg.tdm.guidance_scale)[0]
            self._teacher_samples = draw_samples(self.backbone, teacher, cfg.train.eval_samples, cfg.train.seed + 1,
                                                 device=self.accelerator.device)[0]
        return self._teacher_samples

    def _validate(self, trackers: Trackers | None) -> None:
        """The validation grid (train.validation_every): to the trackers and <run>/validation/step_*.png."""
        t = self.config.train
        first = self._validation is None
        if first:
            self._validation = validation_conditions(self.backbone, t.validation_prompts, t.validation_samples)
        cond, prompts = self._validation
        if first and prompts is not None and trackers is not None:
            write_text_atomic(self.out_dir / "validation" / "prompts.txt", "".join(f"{p}\n" for p in prompts))
        count = len(prompts) if prompts is not None else t.validation_samples
        student = student_samplers(self.student_for_sampling(), self.config.tdm, self.backbone.schedule,
                                   [self.tdm.grid.num_steps])[0]
        grid = validation_grid(self.backbone, student, cond, count, t.seed + 2, self.accelerator.device)
        if trackers is None:  # a sharded student samples on every rank; the main one writes
            return
        step = self.state.step
        atomic_write(self.out_dir / "validation" / f"step_{step:07d}.png", lambda tmp: Image.fromarray(grid).save(tmp))
        trackers.images({"validation/samples": grid}, step)

    def _warn(self, trackers: Trackers | None, logs: dict):
        """Drift and collapse warnings (diagnostics.py): a log line and a tracker text entry."""
        for message in self.diagnostics.update(self.state.step, logs):
            if trackers is not None:
                tqdm.write(f"tdm: warning: {message}", file=sys.stderr)
                trackers.text("warnings", message, self.state.step)

    def _log(self, trackers: Trackers | None, scalars: dict):
        self.history.append({"step": self.state.step, **scalars})
        if trackers is not None:
            trackers.scalars(scalars, self.state.step)

    # ---- checkpoints ----
    def _modules(self) -> dict:
        """The checkpoint's modules: every trainable role's, then the student's EMA."""
        mods = {name: self.accelerator.unwrap_model(module) for name, module in self.modules.items()}
        if self.ema is not None:
            mods["student_ema"] = self.ema
        return mods

    def save(self) -> Path | None:
        """Checkpoint from rank 0, with every rank's RNG state (all ranks must call this)."""
        rng_states = gather_object([torch.get_rng_state()])  # one per rank, in rank order
        state = self.state
        state.checkpointed_step = state.step
        modules, optimizers = self._modules(), self._checkpoint_optimizers()
        if self.sharded:  # full tensors, gathered by every rank
            modules = {name: sharding.full_state(m) for name, m in modules.items()}
            optimizers = {name: sharding.full_state(opt) for name, opt in optimizers.items()}
        if not self.accelerator.is_main_process:
            return None
        rng = {f"torch_rank{r}": rank_state for r, rank_state in enumerate(rng_states)}
        state.checkpoint_path = path = save_checkpoint(self.out_dir / "checkpoints", state.step, modules,
                                                       optimizers, rng, to_dict(self.config),
                                                       self.roles.base_fingerprint, state.manifest_entry())
        if state.divergence.began is None:  # while diverging, keep the good checkpoints from before it
            prune_checkpoints(self.out_dir / "checkpoints", self.config.train.keep_checkpoints)
        write_text_atomic(self.out_dir / "history.json", json.dumps(self.history))
        return path

    def _checkpoint_optimizers(self) -> dict:
        """The checkpoint's optimisers, keyed as their files are named."""
        return {self.role_specs[name].optimizer: opt for name, opt in self.optimizers.items()}

    def resume(self, where: str, start_fresh: bool = False) -> Path | None:
        """Resume from a checkpoint folder, or 'auto' for the newest one in this run that loads (None if there
        is none yet: a first run under a scheduler that always passes --resume auto starts from scratch).
        'auto' moves damaged checkpoints aside (resume.py); if some exist and none loads it raises, unless
        `start_fresh`."""
        modules, optimizers = self._modules(), self._checkpoint_optimizers()
        if self.sharded:  # every rank keeps its shard of the full tensors
            modules = {name: sharding.FullStateLoader(m) for name, m in modules.items()}
            optimizers = {name: sharding.FullStateLoader(opt) for name, opt in optimizers.items()}

        def load(path: Path):
            return load_checkpoint(path, modules, optimizers, self.roles.base_fingerprint)

        if where != "auto":
            path = Path(where)
            step, rng, _ = load(path)
        else:
            root = self.out_dir / "checkpoints"
            path, loaded, damaged = load_newest(root, load)
            if path is None and damaged and not start_fresh:
                raise no_usable_checkpoint(root, damaged)
            self.accelerator.wait_for_everyone()  # every rank has looked at them before they move
            if self.accelerator.is_main_process:
                set_aside(damaged)
            if path is None:
                return None
            step, rng, _ = loaded
        self.state = TrainState.resumed(path, step, read_manifest(path).get("trainer")).track(self.role_specs)
        self._restore_lr_schedules()
        rank_state = rng.get(f"torch_rank{self.accelerator.process_index}")
        if rank_state is not None:  # absent when resuming on more processes than saved the checkpoint
            torch.set_rng_state(rank_state)
        history = self.out_dir / "history.json"
        if history.is_file():
            self.history = [h for h in json.loads(history.read_text()) if h["step"] <= step]
        return path

    # ---- the loop ----
    def train(self) -> Path | None:
        cfg, acc = self.config.train, self.accelerator
        trackers = self.trackers
        if acc.is_main_process:
            self._record_launch()
        bar = tqdm(total=cfg.iterations, initial=self.state.step, disable=not acc.is_main_process, desc=self.stage,
                   mininterval=2.0)
        self._tic, self._tic_step = time.perf_counter(), self.state.step
        with StopSignals(cfg.stop_signals) as stop:
            while self.state.step < cfg.iterations and not self._stop_requested(stop):
                self._iteration(trackers, bar)
        bar.close()
        state = self.state
        path = state.checkpoint_path if state.checkpointed_step == state.step else self.save()
        if trackers is not None:
            trackers.close()
        acc.wait_for_everyone()
        return path

    def _stop_requested(self, stop: StopSignals) -> bool:
        """Whether any rank received a stop signal (all ranks stop at the same iteration)."""
        flag = torch.tensor(float(stop.received is not None), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            self.stopped_by = stop.received or "a stop signal on another rank"
        return self.stopped_by is not None

    def _record_launch(self) -> None:
        """<run>/launch.json: the processes, mixed precision, autocast dtype and sharding this run trains with."""
        acc = self.accelerator
        with acc.autocast():
            autocast_dtype = torch.mm(torch.ones(1, 1, device=acc.device), torch.ones(1, 1, device=acc.device)).dtype
        record = {"num_processes": acc.num_processes, "distributed_type": str(acc.distributed_type),
                  "mixed_precision": acc.mixed_precision, "autocast_dtype": str(autocast_dtype).removeprefix("torch."),
                  "mixed_precision_from": "train.mixed_precision" if self.config.train.mixed_precision else
                  "accelerate", "gradient_accumulation_steps": self.config.train.gradient_accumulation_steps,
                  "trackers": self.trackers.names, "fsdp": self.sharded}
        write_text_atomic(self.out_dir / "launch.json", json.dumps(record, indent=1))

    def _iteration(self, trackers: Trackers | None, bar) -> None:
        """One training iteration plus its logging, evaluation and periodic checkpoint."""
        cfg = self.config.train
        logs = self.train_step()
        if self.thread_budget is not None:
            logs["time/threads"] = self.thread_budget.update()
        bar.update(1)
        step = self.state.step
        log_now = step % cfg.log_every == 0 or step == cfg.iterations
        eval_now = cfg.eval_every > 0 and step % cfg.eval_every == 0
        if log_now:
            now = time.perf_counter()
            logs["time/iteration_s"] = (now - self._tic) / (step - self._tic_step)  # the iterations this interval ran
            self._tic, self._tic_step = now, step
            bar.set_postfix({"generator_loss": f"{logs['generator/loss']:.3g}",
                             "fake_loss": f"{logs['fake/loss']:.3g}"})
        if eval_now:
            logs.update(self._evaluate(trackers))
        if log_now or eval_now:
            self._log(trackers, logs)
            self._warn(trackers, logs)
        if cfg.validation_every and step % cfg.validation_every == 0 and (trackers is not None or self.sharded):
            self._validate(trackers)
        healthy = not any(self.state.nonfinite_in_a_row.values())  # never rotate good checkpoints out mid-fault
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.iterations and healthy:
            self.save()

    def close(self):
        """Tear down cleanly (avoids an abort at exit of multi-process CPU runs; environment.md 5)."""
        self.modules.clear()
        self.optimizers.clear()
        gc.collect()
        self.accelerator.end_training()

