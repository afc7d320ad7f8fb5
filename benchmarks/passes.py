"""Forward/backward passes per role and wall time per TDM iteration: tdm's schedule vs the official code's.

The official script's iteration (method.md H.2) is re-enacted with the same core functions and networks:
a full 4-level rollout, a student forward that recomputes a rollout output, a teacher forward whose result
is unused, and the teacher's conditional and unconditional calls made separately: 11 forwards + 2 backwards.
tdm's iteration runs each sample's rollout only as deep as its draws and takes the generator's student forward
from it (about 7.1F + 2B at K = 4); `tdm-recompute` is train.generator_forward=recompute (about 7.75F + 2B).
A backward is counted in samples / batch, as a forward is.

    python benchmarks/passes.py [--backbone digits|mid] [--batch 64] [--repeats 7] [--block 5] [--out runs/bench]

`mid` is the mid-size UNet2DConditionModel of benchmarks/roles_memory.py (SD1.5's layout at 0.4x its width).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from tdm.config import BackboneConfig, OptimConfig
from tdm.core.algorithm import TDM, TDMConfig
from tdm.core.prediction import PredictionType, to_x0_eps
from tdm.core.sampling import Trajectory
from tdm.core.schedules import DiscreteVP
from tdm.files import write_text_atomic
from tdm.optimizers import build_optimizer
from tdm.registry import build_backbone
from tdm.roles import Roles


class Counted(nn.Module):
    """Counts forward calls and forward and backward equivalents (samples / batch) of a role."""

    def __init__(self, module: nn.Module, batch: int):
        super().__init__()
        self.module, self.batch = module, batch
        self.reset()

    def reset(self):
        self.forwards, self.forward_equivalents, self.backwards = 0, 0.0, 0.0

    def _count_backward(self, grad):
        self.backwards += grad.shape[0] / self.batch
        return grad

    def forward(self, x, t, cond):
        self.forwards += 1
        self.forward_equivalents += x.shape[0] / self.batch
        out = self.module(x, t, cond)
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out


class SeparateCFGCalls(nn.Module):
    """The official code's teacher: conditional and unconditional halves of a CFG batch as two calls."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, x, t, cond):
        return torch.cat([self.teacher(xs, ts, cs) for xs, ts, cs in zip(x.chunk(2), t.chunk(2), cond.chunk(2))])


def _step(optimizer, loss, params=None, clip=None):
    optimizer.zero_grad(set_to_none=True)
    loss.mean().backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()


def tdm_iteration(tdm, roles, opts, batch_inputs, g, generator_step=True):
    """tdm's iteration (Trainer.train_step): each sample's rollout only as deep as its draws, cached (x0, eps), the
    generator's student forward taken from the rollout (or recomputed), one 2B teacher call."""
    cond, uncond, noise = batch_inputs
    shape = noise.shape
    fake_d, gen_d = tdm.draw(shape, g, noise.device), tdm.draw(shape, g, noise.device)
    traj = tdm.rollout_for(roles.student, noise, cond, [fake_d], gen_d, generator_step)
    _step(opts[1], tdm.fake_score_loss(roles.fake_score, traj, fake_d, cond)[0])
    loss = tdm.generator_loss(roles.student, roles.teacher, roles.fake_score, traj, gen_d, cond, uncond)[0]
    _step(opts[0], loss, roles.student.parameters(), 1.0)


def tdm_recompute_iteration(tdm, roles, opts, batch_inputs, g):
    """train.generator_forward=recompute: the generator's student forward after the fake update."""
    tdm_iteration(tdm, roles, opts, batch_inputs, g, generator_step=False)


def official_iteration(tdm, roles, opts, batch_inputs, g):
    """The official schedule, same math: full rollout, recomputed student outputs, an unused teacher call."""
    cond, uncond, noise = batch_inputs
    shape = noise.shape
    fake_d, gen_d = tdm.draw(shape, g), tdm.draw(shape, g)
    traj = tdm.student_trajectory(roles.student, noise, cond, 1)  # always all K levels
    with torch.no_grad():
        x_k = traj.gather("states", fake_d.k)
        x0, eps = to_x0_eps(roles.student(x_k, fake_d.t_k, cond), x_k, fake_d.t_k, tdm.schedule, tdm.prediction)
        roles.teacher(x_k, fake_d.tau, cond)  # computed and never used, as in the official script
    levels = range(1, tdm.grid.num_steps + 1)
    recomputed = Trajectory(traj.states, {k: x0 for k in levels}, {k: eps for k in levels})
    _step(opts[1], tdm.fake_score_loss(roles.fake_score, recomputed, fake_d, cond)[0])
    loss = tdm.generator_loss(roles.student, SeparateCFGCalls(roles.teacher), roles.fake_score, traj, gen_d,
                              cond, uncond)[0]
    _step(opts[0], loss, roles.student.parameters(), 1.0)


def _networks(name: str, batch: int, g: torch.Generator):
    """(teacher, schedule, prediction, (cond, uncond, noise)) of the digits toy or the mid-size UNet."""
    if name == "mid":
        from diffusers import UNet2DConditionModel

        from roles_memory import CONFIGS, TextUNet  # benchmarks/ is on sys.path when run as a script

        kwargs = CONFIGS["mid"]
        torch.manual_seed(0)
        teacher = TextUNet(UNet2DConditionModel(**kwargs))
        cond = torch.randn(batch, 8, kwargs["cross_attention_dim"], generator=g)
        noise = torch.randn((batch, kwargs["in_channels"], kwargs["sample_size"], kwargs["sample_size"]), generator=g)
        schedule = DiscreteVP.from_betas("scaled_linear", 1000, 0.00085, 0.012)
        return teacher, schedule, PredictionType.EPSILON, (cond, torch.zeros_like(cond), noise)
    backbone = build_backbone(BackboneConfig(name=name))
    inputs = (backbone.sample_conditions(batch, g), backbone.null_condition(batch),
              torch.randn((batch, *backbone.sample_shape), generator=g))
    return backbone.teacher, backbone.schedule, backbone.prediction, inputs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="digits", help="digits (or another registered toy) | mid")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--counted", type=int, default=20, help="iterations whose passes are counted")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--block", type=int, default=5, help="iterations per timed block")
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    teacher, schedule, prediction, inputs = _networks(args.backbone, args.batch, g)
    base = Roles.separate_copies(teacher, teacher)
    roles = Roles(*(Counted(m, args.batch) for m in (base.teacher, base.student, base.fake_score)))
    tdm = TDM(schedule, prediction, TDMConfig(total_steps=1000, guidance_scale=2.0))
    # tdm's optimisers as the trainer builds them (fused AdamW where torch has the kernel); the official script's
    # plain torch.optim.AdamW (its per-parameter loop on the CPU, the multi-tensor step on a GPU)
    optim = OptimConfig(generator_lr=1e-6, fake_lr=5e-6)
    tdm_opts = (build_optimizer(roles.student.parameters(), optim.generator_lr, optim),
                build_optimizer(roles.fake_score.parameters(), optim.fake_lr, optim))
    official_opts = (torch.optim.AdamW(roles.student.parameters(), optim.generator_lr, betas=optim.betas),
                     torch.optim.AdamW(roles.fake_score.parameters(), optim.fake_lr, betas=optim.betas))
    schedules = {"tdm": partial(tdm_iteration, opts=tdm_opts),
                 "tdm-recompute": partial(tdm_recompute_iteration, opts=tdm_opts),
                 "official": partial(official_iteration, opts=official_opts)}

    # Passes: exact counts over many iterations (draws vary per iteration: report the mean and the maximum).
    counts = {}
    for name, fn in schedules.items():
        per_iter = []
        for _ in range(args.counted):
            for r in (roles.teacher, roles.student, roles.fake_score):
                r.reset()
            fn(tdm, roles, batch_inputs=inputs, g=g)
            per_iter.append({role: (m.forward_equivalents, m.backwards) for role, m in
                             (("student", roles.student), ("teacher", roles.teacher), ("fake", roles.fake_score))})
        total_f = [sum(f for f, _ in it.values()) for it in per_iter]
        counts[name] = {
            "forwards_mean": statistics.mean(total_f), "forwards_max": max(total_f),
            "backwards": max(sum(b for _, b in it.values()) for it in per_iter),
            "per_role_mean": {role: [statistics.mean(it[role][i] for it in per_iter) for i in (0, 1)]
                              for role in per_iter[0]},
        }

    # Time: warm up, then interleave the schedules; median of `repeats` blocks of `block` iterations. Wall time and
    # the process's CPU time: at one thread they agree on a quiet machine, and CPU time is what survives sharing it.
    times = {name: [] for name in schedules}
    cpu_times = {name: [] for name in schedules}
    for fn in schedules.values():
        fn(tdm, roles, batch_inputs=inputs, g=g)
    for _ in range(args.repeats):
        for name, fn in schedules.items():
            tic, cpu_tic = time.perf_counter(), time.process_time()
            for _ in range(args.block):
                fn(tdm, roles, batch_inputs=inputs, g=g)
            times[name].append((time.perf_counter() - tic) / args.block)
            cpu_times[name].append((time.process_time() - cpu_tic) / args.block)
    med = {name: statistics.median(v) for name, v in times.items()}
    cpu_med = {name: statistics.median(v) for name, v in cpu_times.items()}

    print(f"backbone={args.backbone} batch={args.batch} K=4 CFG=2 threads={torch.get_num_threads()} "
          f"repeats={args.repeats}")
    print(f"{'schedule':14} {'fwd (mean)':>10} {'fwd (max)':>9} {'bwd':>4} {'student F/B':>12} {'teacher F':>9} "
          f"{'fake F/B':>9} {'s/iter':>8} {'/official':>9} {'cpu s/iter':>10} {'/official':>9}")
    for name, c in counts.items():
        pr = c["per_role_mean"]
        print(f"{name:14} {c['forwards_mean']:10.3f} {c['forwards_max']:9.3f} {c['backwards']:4.0f} "
              f"{pr['student'][0]:7.3f}/{pr['student'][1]:<4.0f} {pr['teacher'][0]:9.0f} "
              f"{pr['fake'][0]:5.0f}/{pr['fake'][1]:<3.0f} {med[name]:8.4f} {med[name] / med['official']:9.3f} "
              f"{cpu_med[name]:10.4f} {cpu_med[name] / cpu_med['official']:9.3f}")
    ratios = {name: med[name] / med["official"] for name in schedules}
    out = Path(args.out)
    command = "python benchmarks/passes.py " + " ".join(sys.argv[1:])
    result = {"command": command.strip(), "backbone": args.backbone, "batch": args.batch,
              "threads": torch.get_num_threads(), "counts": counts, "seconds_per_iteration_median": med,
              "seconds_all": times, "ratio_to_official": ratios,
              "cpu_seconds_per_iteration_median": cpu_med, "cpu_seconds_all": cpu_times,
              "cpu_ratio_to_official": {name: cpu_med[name] / cpu_med["official"] for name in schedules}}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"passes_{args.backbone}.json"
    write_text_atomic(path, json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
