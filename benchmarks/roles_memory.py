"""Peak memory of the two role strategies over a few TDM training iterations on diffusers UNet2DConditionModels.

`separate`: student and fake score are full copies of the teacher (three backbones, two full AdamW states);
`lora`: one frozen base with two LoRA adapters (tdm.roles). Each (config, strategy, generator forward) runs in a
fresh subprocess: randomly initialised UNet from config, the roles, AdamW per role, then `--iterations` TDM
iterations (`passes.tdm_iteration`: rollout, fake-score update, generator update with clipping, teacher CFG
in one 2B call, as tdm's trainer does), with the generator's student forward taken from the rollout (`rollout`,
its activations held through the fake update) or recomputed after it (`recompute`): train.generator_forward.
Memory on the CPU is the process's peak resident set (VmHWM) minus its resident set just before the model is
built; on CUDA it is torch.cuda.max_memory_allocated.

    python benchmarks/roles_memory.py [--configs tiny mid] [--iterations 3] [--batch 2] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from tdm.files import write_text_atomic

SD_BLOCKS = {"down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
CONFIGS = {  # UNet2DConditionModel kwargs; `mid` is SD1.5's layout at 0.4x its width (SD1.5: 320..1280, 860 M)
    "tiny": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
             "block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32,
             "attention_head_dim": 8, "norm_num_groups": 8},
    "mid": {"sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": (128, 256, 512, 512), **SD_BLOCKS, "cross_attention_dim": 768,
            "attention_head_dim": 8},
}
LORA = {"rank": 16, "alpha": 16.0, "targets": ("attention",)}


class TextUNet(torch.nn.Module):
    """The UNet as `module(x_t, t, cond)` with cond = text embeddings [B, L, cross_attention_dim]."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x_t, t, cond):
        return self.unet(x_t, t, encoder_hidden_states=cond).sample


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def measure(config: str, strategy: str, generator_forward: str, iterations: int, batch: int, device: str,
            checkpointing: bool) -> dict:
    """One (config, strategy) run in this process; call it in a fresh process only."""
    from diffusers import UNet2DConditionModel

    from passes import tdm_iteration  # the trainer's iteration: shared rollout, fake then generator update
    from tdm.core.algorithm import TDM, TDMConfig
    from tdm.core.prediction import PredictionType
    from tdm.core.schedules import DiscreteVP
    from tdm.roles import Roles

    kwargs = CONFIGS[config]
    g = torch.Generator().manual_seed(0)
    shape = (batch, kwargs["in_channels"], kwargs["sample_size"], kwargs["sample_size"])
    cond = torch.randn(batch, 8, kwargs["cross_attention_dim"], generator=g).to(device)
    uncond, noise = torch.zeros_like(cond), torch.randn(shape, generator=g).to(device)
    tdm = TDM(DiscreteVP.from_betas("scaled_linear", 1000, 0.00085, 0.012), PredictionType.EPSILON,
              TDMConfig(num_steps=4, total_steps=1000, guidance_scale=2.0))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start_rss = _status_mib("VmRSS")

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**kwargs)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    teacher = TextUNet(unet)
    base_params = sum(p.numel() for p in teacher.parameters())
    roles = (Roles.separate_copies(teacher, teacher) if strategy == "separate" else
             Roles.lora(teacher, teacher, LORA["rank"], LORA["alpha"], LORA["targets"])).to(device)
    opt_g = torch.optim.AdamW(roles.student.parameters(), lr=1e-6, betas=(0.0, 0.95))
    opt_f = torch.optim.AdamW(roles.fake_score.parameters(), lr=5e-6, betas=(0.0, 0.95))
    tic = time.perf_counter()
    for _ in range(iterations):
        tdm_iteration(tdm, roles, (opt_g, opt_f), (cond, uncond, noise), g, generator_forward == "rollout")
    seconds = (time.perf_counter() - tic) / iterations
    held = [roles.shared.base] if roles.shared is not None else [roles.teacher, roles.student, roles.fake_score]
    result = {
        "config": config, "strategy": strategy, "generator_forward": generator_forward, "device": device,
        "iterations": iterations, "batch": batch,
        "base_params": base_params,
        "trainable_params": {"student": sum(p.numel() for p in roles.student.parameters()),
                             "fake_score": sum(p.numel() for p in roles.fake_score.parameters())},
        "resident_params": sum(p.numel() for m in held for p in m.parameters()),  # every weight held, once
        "seconds_per_iteration": seconds,
    }
    if device == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result.update(baseline_rss_mib=start_rss, peak_rss_mib=_status_mib("VmHWM"))
        result["peak_mib"] = result["peak_rss_mib"] - start_rss
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--generator-forward", nargs="+", default=["rollout", "recompute"],
                        choices=["rollout", "recompute"])
    parser.add_argument("--strategies", nargs="+", default=["separate", "lora"], choices=["separate", "lora"])
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute the UNet's blocks in backward")
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "STRATEGY", "FORWARD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(*args.child, args.iterations, args.batch, args.device,
                                 args.gradient_checkpointing)))
        return

    rows = []
    for config in args.configs:
        for strategy in args.strategies:
            for forward in args.generator_forward:
                cmd = [sys.executable, __file__, "--child", config, strategy, forward, "--iterations",
                       str(args.iterations), "--batch", str(args.batch), "--threads", str(args.threads),
                       "--device", args.device, *["--gradient-checkpointing"] * args.gradient_checkpointing]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{config:5} {strategy:9} {forward:9} base {r['base_params'] / 1e6:7.2f} M  trainable/role "
                      f"{r['trainable_params']['student'] / 1e6:7.3f} M  peak {r['peak_mib']:8.1f} MiB  "
                      f"{r['seconds_per_iteration']:.2f} s/it", flush=True)

    def peak(config, strategy, forward=args.generator_forward[0]):
        return next(r["peak_mib"] for r in rows if (r["config"], r["strategy"], r["generator_forward"]) ==
                    (config, strategy, forward))

    ratios = {}
    if len(args.strategies) == 2:
        ratios = {c: peak(c, "separate") / peak(c, "lora") for c in args.configs}
        print("peak memory separate / lora: " + ", ".join(f"{c} {v:.2f}x" for c, v in ratios.items()))
    held = {}
    if len(args.generator_forward) == 2:
        held = {f"{c}/{s}": peak(c, s, "rollout") / peak(c, s, "recompute") for c in args.configs
                for s in args.strategies}
        print("peak memory rollout / recompute: " + ", ".join(f"{k} {v:.3f}x" for k, v in held.items()))
    out = Path(args.out)
    command = "python benchmarks/roles_memory.py " + " ".join(sys.argv[1:])
    result = {"command": command.strip(), "device": args.device, "threads": args.threads, "lora": LORA,
              "gradient_checkpointing": args.gradient_checkpointing,
              "configs": {c: CONFIGS[c] for c in args.configs}, "rows": rows, "ratio_separate_over_lora": ratios,
              "ratio_rollout_over_recompute": held}
    write_text_atomic(out / "roles_memory.json", json.dumps(result, indent=1))
    print(f"wrote {out / 'roles_memory.json'}")


if __name__ == "__main__":
    main()
