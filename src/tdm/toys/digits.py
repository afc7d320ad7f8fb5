"""The `digits` toy: scikit-learn's bundled 8x8 handwritten digits as a class-conditional diffusion teacher.

`DigitsUNet` is a small epsilon-prediction U-Net on the DDPM linear schedule, conditioned on a class label
(`NULL_CLASS` = unconditional, for classifier-free guidance). `DigitsClassifier` is a small CNN whose
penultimate features give a "classifier Frechet distance" and whose argmax gives class accuracy. Both train
on the train split only, deterministically on the CPU, and ship in `weights/` as safetensors + JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import time
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..backbones.base import Backbone
from ..core.prediction import PredictionType
from ..core.schedules import DiscreteVP
from ..files import atomic_write, write_text_atomic
from ..meta_init import denoiser_on_meta_requested
from ..metrics import frechet_distance

NUM_CLASSES = 10
NULL_CLASS = 10  # the extra label of the unconditional branch
LABEL_DROPOUT = 0.1  # fraction of teacher training labels replaced by NULL_CLASS
TEACHER_KWARGS = {"channels": [32, 64], "emb_dim": 128, "groups": 8}
CLASSIFIER_KWARGS = {"channels": [32, 64], "feature_dim": 64, "dropout": 0.2}
WEIGHTS_DIR = Path(__file__).parent / "weights"
TEACHER_FILE = "digits_teacher.safetensors"
CLASSIFIER_FILE = "digits_classifier.safetensors"
SCHEDULE = {"type": "DiscreteVP", "beta_schedule": "linear", "num_train_timesteps": 1000,
            "beta_start": 1e-4, "beta_end": 0.02}


def make_schedule() -> DiscreteVP:
    """The teacher's schedule: DDPM linear betas from 1e-4 to 0.02 over 1000 steps."""
    return DiscreteVP.from_betas(SCHEDULE["beta_schedule"], SCHEDULE["num_train_timesteps"],
                                 SCHEDULE["beta_start"], SCHEDULE["beta_end"])


# ----------------------------------------------------------------------------------------------- data

def load_digits_split(heldout_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train_x, train_y, heldout_x, heldout_y): images [N, 1, 8, 8] in [-1, 1], labels long.

    The split is stratified: a fixed `heldout_fraction` of every class, chosen with a seeded permutation.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)  # pixels 0..16 -> [-1, 1]
    y = torch.from_numpy(data.target.astype(np.int64))
    rng = np.random.default_rng(seed)
    heldout = np.zeros(len(y), dtype=bool)
    for c in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(data.target == c))
        heldout[members[: round(heldout_fraction * len(members))]] = True
    mask = torch.from_numpy(heldout)
    return x[~mask], y[~mask], x[mask], y[mask]


# --------------------------------------------------------------------------------------------- models

def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [B, dim] of raw timesteps t [B] (long or float, on the 0..999 axis)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block; the embedding sets a scale and shift of the second norm."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class DigitsUNet(nn.Module):
    """Epsilon-prediction U-Net on 8x8 images: levels 8x8 (channels[0]) and 4x4 (channels[1]) with skips.

    `forward(x_t [B, 1, 8, 8], t [B] on the 0..999 axis, cond [B] labels 0..9 or NULL_CLASS) -> eps`.
    """

    _no_split_modules = ["ResBlock"]  # the units FSDP shards (tdm.sharding), as diffusers models name theirs

    def __init__(self, channels: tuple[int, int] = (32, 64), emb_dim: int = 128, groups: int = 8):
        super().__init__()
        c1, c2 = channels
        self.time_dim = c1
        self.time_mlp = nn.Sequential(nn.Linear(c1, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(NULL_CLASS + 1, emb_dim)
        self.conv_in = nn.Conv2d(1, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim, groups)
        self.downsample = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.down2 = ResBlock(c2, c2, emb_dim, groups)
        self.mid = ResBlock(c2, c2, emb_dim, groups)
        self.up2 = ResBlock(2 * c2, c2, emb_dim, groups)
        self.upsample = nn.Sequential(nn.Conv2d(c2, c1, 1), nn.Upsample(scale_factor=2, mode="nearest"))
        self.up1 = ResBlock(2 * c1, c1, emb_dim, groups)
        self.norm_out = nn.GroupNorm(groups, c1)
        self.conv_out = nn.Conv2d(c1, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # ~1.5x faster convolutions on the CPU
        emb = F.silu(self.time_mlp(timestep_embedding(t, self.time_dim)) + self.class_emb(cond.long()))
        h1 = self.down1(self.conv_in(x), emb)  # 8x8
        h2 = self.down2(self.downsample(h1), emb)  # 4x4
        h = self.mid(h2, emb)
        h = self.up2(torch.cat([h, h2], dim=1), emb)
        h = self.up1(torch.cat([self.upsample(h), h1], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class DigitsClassifier(nn.Module):
    """Small CNN on [B, 1, 8, 8] images in [-1, 1]: `forward` -> logits [B, 10], `features` -> [B, feature_dim]."""

    def __init__(self, channels: tuple[int, int] = (32, 64), feature_dim: int = 64, dropout: float = 0.2):
        super().__init__()
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 2x2
            nn.Flatten(), nn.Linear(4 * c2, feature_dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(feature_dim, NUM_CLASSES))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate pre-activations, the space of the classifier Frechet distance.

        Taken before the ReLU: units that never fire would make the feature covariance singular.
        """
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


# ------------------------------------------------------------------------------------------- file I/O

def _save(module: nn.Module, config: dict, out_dir: str | Path, filename: str) -> Path:
    """Save fp32 weights as `filename` and `config` as the JSON file of the same stem; returns the weights path."""
    path = Path(out_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
    atomic_write(path, lambda p: save_file(tensors, str(p)))
    write_text_atomic(path.with_suffix(".json"), json.dumps(config, indent=2) + "\n")
    return path


def _load(cls: type[nn.Module], path: str | Path | None, filename: str, on_meta: bool = False) -> nn.Module:
    """Build `cls` from the JSON kwargs beside the weights and load them (`on_meta`: build it on the meta device
    and read no weights).

    `path` is a weights file, a directory holding `filename`, or None / "" for the shipped weights.
    """
    p = Path(path) if path else WEIGHTS_DIR
    if p.is_dir():
        p = p / filename
    config = json.loads(p.with_suffix(".json").read_text())
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        module = cls(**config["kwargs"])
    if not on_meta:
        module.load_state_dict(load_file(str(p)))
    return module.eval()


def load_teacher(path: str | Path | None = None, on_meta: bool = False) -> DigitsUNet:
    """The teacher U-Net in eval mode (default: the shipped `weights/digits_teacher.safetensors`); `on_meta`: its
    shapes alone, on the meta device (tdm.meta_init)."""
    return _load(DigitsUNet, path, TEACHER_FILE, on_meta)


def load_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The metric classifier in eval mode (default: the shipped `weights/digits_classifier.safetensors`)."""
    return _load(DigitsClassifier, path, CLASSIFIER_FILE)


# ------------------------------------------------------------------------------------------- training

def _cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, num_updates: int) -> None:
    """EMA with warmup: decay = min(0.999, (1 + n) / (10 + n))."""
    decay = min(0.999, (1 + num_updates) / (10 + num_updates))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def _optimizer_step(opt: torch.optim.Optimizer, loss: Tensor, lr: float, clip: float | None = None) -> None:
    """Set the learning rate, backpropagate `loss` (clipping the gradient norm if asked) and step."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
    opt.step()


def _run_info(start_wall: float, start_cpu: float) -> dict:
    """Thread count and wall / process CPU seconds of a training run."""
    return {"threads": torch.get_num_threads(), "wall_seconds": round(time.time() - start_wall, 1),
            "cpu_seconds": round(time.process_time() - start_cpu, 1)}


def _command(subcommand: str, out_dir: str | Path, **options) -> str:
    """The CLI line that reproduces a training run."""
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items())
    return f"python -m tdm.toys.digits {subcommand} --out {out_dir} {flags}"


def train_teacher(out_dir: str | Path, steps: int = 3000, batch_size: int = 128, seed: int = 0,
                  lr: float = 2e-3, log_every: int = 500) -> Path:
    """Train the teacher by DDPM denoising score matching on the train split; save its EMA weights.

    Epsilon prediction, uniform t in 0..999, labels dropped to NULL_CLASS with probability 0.1 (for CFG),
    AdamW with warmup + cosine decay, gradient clipping at 1. Deterministic given `seed` and thread count.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y, _, _ = load_digits_split()
    schedule = make_schedule()
    model = DigitsUNet(**TEACHER_KWARGS)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    start, start_cpu = time.time(), time.process_time()
    for step in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=gen)
        labels = torch.where(torch.rand(batch_size, generator=gen) < LABEL_DROPOUT, NULL_CLASS, y[idx])
        t = torch.randint(schedule.num_train_timesteps, (batch_size,), generator=gen)
        noise = torch.randn((batch_size, *x.shape[1:]), generator=gen)
        loss = F.mse_loss(model(schedule.add_noise(x[idx], noise, t), t, labels), noise)
        _optimizer_step(opt, loss, _cosine_lr(step, steps, lr, warmup=min(200, steps)), clip=1.0)
        _update_ema(ema, model, step)
        if log_every and (step + 1) % log_every == 0:
            print(f"teacher step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    config = {
        "model": "DigitsUNet", "kwargs": TEACHER_KWARGS, "schedule": SCHEDULE, "prediction": "epsilon",
        "null_class": NULL_CLASS, "weights": "EMA, fp32",
        "training": {
            "command": _command("train-teacher", out_dir, steps=steps, batch_size=batch_size, seed=seed, lr=lr),
            "steps": steps, "batch_size": batch_size, "seed": seed, "lr": lr, "label_dropout": LABEL_DROPOUT,
            "ema": "min(0.999, (1 + n) / (10 + n))", "data": "sklearn load_digits, train split",
            **_run_info(start, start_cpu),
        },
    }
    return _save(ema, config, out_dir, TEACHER_FILE)


def _random_shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Shift each image by -1..1 pixels in x and y, filling with background (-1)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(3, (2, x.shape[0]), generator=generator)
    rows = (dy[:, None] + torch.arange(8))[:, None, :, None].expand(-1, 1, 8, 10)
    cols = (dx[:, None] + torch.arange(8))[:, None, None, :].expand(-1, 1, 8, 8)
    return padded.gather(2, rows).gather(3, cols)


@torch.no_grad()
def classifier_accuracy(classifier: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of images whose argmax logit is their label."""
    return (classifier(x).argmax(1) == y).float().mean().item()


def train_classifier(out_dir: str | Path, steps: int = 3000, batch_size: int = 128, seed: int = 0,
                     lr: float = 2e-3, log_every: int = 500) -> Path:
    """Train the metric classifier on the train split (±1 pixel shifts); save it with its held-out accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y, hx, hy = load_digits_split()
    model = DigitsClassifier(**CLASSIFIER_KWARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    start, start_cpu = time.time(), time.process_time()
    for step in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(_random_shift(x[idx], gen)), y[idx])
        _optimizer_step(opt, loss, _cosine_lr(step, steps, lr, warmup=min(100, steps)))
        if log_every and (step + 1) % log_every == 0:
            print(f"classifier step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    accuracy = classifier_accuracy(model, hx, hy)
    print(f"classifier held-out accuracy {accuracy:.4f}")
    config = {
        "model": "DigitsClassifier", "kwargs": CLASSIFIER_KWARGS, "heldout_accuracy": round(accuracy, 4),
        "training": {
            "command": _command("train-classifier", out_dir, steps=steps, batch_size=batch_size, seed=seed, lr=lr),
            "steps": steps, "batch_size": batch_size, "seed": seed, "lr": lr,
            "augmentation": "random shifts of -1..1 pixels", "data": "sklearn load_digits, train split",
            **_run_info(start, start_cpu),
        },
    }
    return _save(model, config, out_dir, CLASSIFIER_FILE)


# ------------------------------------------------------------------------------------------- backbone

class DigitsBackbone(Backbone):
    """The digits teacher for TDM: class labels as conditions, classifier FD and accuracy as metrics.

    Conditions are long label tensors on the teacher's device; metrics run on the CPU.
    """

    name = "digits"
    time_embedding_module = "time_mlp"
    prediction = PredictionType.EPSILON
    sample_shape = (1, 8, 8)
    is_image = True
    features_description = "the digits classifier's penultimate layer (a classifier FD, not FID)"
    lora_targets = ("conv1", "conv2", "emb")  # every ResBlock's convolutions and embedding projection
    metrics_description = ("`fd_train`, `fd_heldout`: classifier FD to the real training and held-out digits; "
                           "`class_accuracy`: the classifier agrees with the requested class. The floor row "
                           "scores real held-out digits.")

    def __init__(self, teacher_path: str | None = None):
        self.teacher = load_teacher(teacher_path, on_meta=denoiser_on_meta_requested())
        self.schedule = make_schedule()
        self.classifier = load_classifier()

    @property
    def _device(self) -> torch.device:
        return next(self.teacher.parameters()).device

    def sample_conditions(self, batch: int, generator: torch.Generator) -> Tensor:
        """Uniform random labels 0..9 drawn with `generator` (on the generator's device)."""
        return torch.randint(NUM_CLASSES, (batch,), generator=generator, device=generator.device)

    def null_condition(self, batch: int) -> Tensor:
        return torch.full((batch,), NULL_CLASS, dtype=torch.long, device=self._device)

    def evaluation_conditions(self, num_samples: int) -> Tensor:
        """Balanced labels 0, 1, ..., 9, 0, 1, ..."""
        return torch.arange(num_samples, device=self._device) % NUM_CLASSES

    def evaluation_prompts(self, num_samples: int) -> list[str]:
        """'a handwritten digit 0', ... for the balanced labels of `evaluation_conditions`."""
        return [f"a handwritten digit {c}" for c in self.evaluation_conditions(num_samples).tolist()]

    @torch.no_grad()
    def features(self, samples: Tensor) -> Tensor:
        """Classifier features [N, D] (CPU) of samples [N, 1, 8, 8], clamped to the image range first."""
        return self.classifier.features(samples.detach().float().cpu().clamp(-1, 1))

    @cached_property
    def _reference_features(self) -> dict[str, Tensor]:
        train_x, _, heldout_x, _ = load_digits_split()
        return {"train": self.features(train_x), "heldout": self.features(heldout_x)}

    @torch.no_grad()
    def metrics(self, samples: Tensor, cond: Tensor) -> dict[str, float]:
        """fd_train / fd_heldout: classifier Frechet distance to the real splits; class_accuracy: argmax == cond."""
        feats = self.features(samples)
        predicted = self.classifier.head(feats).argmax(1)
        return {
            "fd_train": frechet_distance(feats, self._reference_features["train"]),
            "fd_heldout": frechet_distance(feats, self._reference_features["heldout"]),
            "class_accuracy": (predicted == cond.cpu()).float().mean().item(),
        }

    def floor_metrics(self, num_samples: int) -> dict[str, float]:
        """`metrics` of the real held-out split (its first `num_samples` of 359 images) against its labels.

        Its fd_train is the real-data floor (fd_heldout, 0 by construction, is left out). With fewer real
        images than samples, the floor's FD carries more small-sample bias than the rows it is compared with.
        """
        _, _, heldout_x, heldout_y = load_digits_split()
        floor = self.metrics(heldout_x[:num_samples], heldout_y[:num_samples])
        del floor["fd_heldout"]
        return floor

    def to_images(self, samples: Tensor) -> Tensor:
        return ((samples + 1) / 2).clamp(0, 1)


# ------------------------------------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None) -> None:
    """`python -m tdm.toys.digits {train-teacher, train-classifier} --out DIR [options]`."""
    parser = argparse.ArgumentParser(prog="python -m tdm.toys.digits", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train-teacher", "train-classifier"):
        p = sub.add_parser(name, help="defaults: those of the training function")
        p.add_argument("--out", default=str(WEIGHTS_DIR), help="output directory")
        p.add_argument("--steps", type=int)
        p.add_argument("--batch-size", type=int)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--lr", type=float)
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train = train_teacher if args.command == "train-teacher" else train_classifier
    options = {k: v for k, v in vars(args).items() if k in ("steps", "batch_size", "seed", "lr") and v is not None}
    path = train(args.out, **options)
    print(f"wrote {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
