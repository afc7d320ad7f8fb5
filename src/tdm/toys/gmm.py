"""toy-gmm: a 2-D class-conditional Gaussian mixture whose diffused denoiser is known in closed form.

Eight isotropic modes N(mu_j, s^2 I) sit on a ring; class c owns modes j = c (mod 4), so classes 0..3
own two opposite modes each and `NULL_CLASS` (= 4) stands for the whole mixture (the unconditional
model of classifier-free guidance). Because every component stays Gaussian under x_t = alpha x0 + sigma eps,
E[x0 | x_t, c] is exact (`ExactGMMDenoiser`), which makes this toy a teacher with zero fitting error.
`ToyMLP` is the small network that students and fake scores use; `fit_to_teacher` regresses it onto the
exact teacher, `train_dsm` trains it as an ordinary (imperfect) teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..backbones.base import Backbone
from ..core.prediction import PredictionType, from_x0_eps
from ..core.schedules import DiscreteVP, Schedule
from ..metrics import energy_distance

NULL_CLASS = 4        # label of the unconditional model: all modes
NUM_CLASSES = 4       # classes 0..3; class c owns modes j with j % NUM_CLASSES == c
MODE_RADIUS_STDS = 3.0  # a sample is "in" a mode within this many stds of its mean
REFERENCE_SEED = 20_240_531  # seed of the true samples that `GMMBackbone.metrics` compares against


# ----------------------------------------------------------------------------------------------- mixture


def _log_gaussian(x: Tensor, means: Tensor, var: Tensor) -> Tensor:
    """log N(x; mean_j, var I) for x [N, D], means [N, M, D] or [M, D], var [N] -> [N, M]."""
    sq = ((x.unsqueeze(1) - means) ** 2).sum(-1)
    var = var.unsqueeze(-1)
    return -0.5 * sq / var - 0.5 * x.shape[-1] * torch.log(2 * math.pi * var)


class GaussianMixture:
    """Equal-weight isotropic modes on a ring of `radius`; labels pick which modes a sample may come from."""

    def __init__(self, num_modes: int = 8, radius: float = 2.0, std: float = 0.15):
        if num_modes % NUM_CLASSES:
            raise ValueError(f"num_modes must be a multiple of {NUM_CLASSES}, got {num_modes}")
        angles = 2 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
        self.means = radius * torch.stack([angles.cos(), angles.sin()], -1)  # [M, 2], float64
        self.std = std
        owner = torch.arange(num_modes) % NUM_CLASSES
        membership = owner.unsqueeze(0) == torch.arange(NUM_CLASSES + 1).unsqueeze(1)
        membership[NULL_CLASS] = True
        self.membership = membership  # [NUM_CLASSES + 1, M]: which modes each label owns

    def modes(self, label: int) -> Tensor:
        """Means [K, 2] (float32) of the modes that `label` owns (all of them for NULL_CLASS)."""
        return self.means[self.membership[label]].float()

    def log_weights(self, labels: Tensor) -> Tensor:
        """log pi_j(label) [N, M] in float64: log(1 / #owned) on owned modes, -inf elsewhere."""
        own = self.membership.to(labels.device)[labels.long()].double()
        return (own / own.sum(-1, keepdim=True)).log()

    def sample(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x0 ~ p(x0 | label) for labels [N] (on CPU, drawn with `generator`) -> [N, 2] float32."""
        own = self.membership[labels.long().cpu()].double()
        mode = torch.multinomial(own, 1, generator=generator).squeeze(1)
        noise = torch.randn(labels.numel(), 2, generator=generator, dtype=torch.float64)
        return (self.means[mode] + self.std * noise).float().to(labels.device)

    def log_prob(self, x: Tensor, labels: Tensor) -> Tensor:
        """log p(x | label) [N]: log sum_j pi_j N(x; mu_j, s^2 I), in float64."""
        var = torch.full((x.shape[0],), self.std**2, dtype=torch.float64, device=x.device)
        log_n = _log_gaussian(x.double(), self.means.to(x.device), var)
        return torch.logsumexp(self.log_weights(labels) + log_n, -1)


# ------------------------------------------------------------------------------------------ exact teacher


class ExactGMMDenoiser(nn.Module):
    """Closed-form denoiser of the diffused mixture, returning the raw output of `prediction`.

    Component j diffuses to N(alpha mu_j, v I) with v = alpha^2 s^2 + sigma^2, so with responsibilities
    r_j ∝ pi_j N(x_t; alpha mu_j, v I) (log-sum-exp) the posterior mean is
        E[x0 | x_t] = m + (alpha s^2 / v) (x_t - alpha m),   m = sum_j r_j mu_j,
    and eps = (x_t - alpha x0) / sigma = (sigma / v) (x_t - alpha m), which stays finite at sigma = 0.
    """

    def __init__(self, mixture: GaussianMixture, schedule: Schedule, prediction: PredictionType | str):
        super().__init__()
        self.mixture = mixture
        self.schedule = schedule
        self.prediction = PredictionType.parse(prediction)

    def x0_eps(self, x_t: Tensor, t: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """Exact (E[x0 | x_t, cond], E[eps | x_t, cond]) in float64."""
        x = x_t.double()
        a, s = self.schedule.alpha(t).double(), self.schedule.sigma(t).double()
        var = a**2 * self.mixture.std**2 + s**2
        log_pi = self.mixture.log_weights(cond)
        means = self.mixture.means.to(x.device)  # float64, untouched by module casts (no buffers)
        r = torch.softmax(log_pi + _log_gaussian(x, a[:, None, None] * means, var), -1)
        m = r @ means
        residual = x - a[:, None] * m
        x0 = m + (a * self.mixture.std**2 / var)[:, None] * residual
        eps = (s / var)[:, None] * residual
        return x0, eps

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        x0, eps = self.x0_eps(x_t, t, cond)
        return from_x0_eps(x0, eps, t, self.schedule, self.prediction)


# ------------------------------------------------------------------------------------------- the network


def timestep_embedding(u: Tensor, features: int, max_frequency: float = 300.0) -> Tensor:
    """Sinusoidal features [sin(f_k u), cos(f_k u)] of u in [0, 1], f_k geometric in [1, max_frequency]."""
    freqs = torch.logspace(0, math.log10(max_frequency), features // 2, device=u.device)
    angles = u.float().unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)


class TimeFeatures(nn.Module):
    """The sinusoidal features of t / T as a module, so step conditioning can hook its output."""

    def __init__(self, out_features: int, num_train_timesteps: int):
        super().__init__()
        self.out_features, self.num_train_timesteps = out_features, num_train_timesteps

    def forward(self, t: Tensor) -> Tensor:
        return timestep_embedding(t / self.num_train_timesteps, self.out_features)


class ToyMLP(nn.Module):
    """x_t [B, 2], t [B] (schedule axis), label [B] -> raw output [B, 2]; an MLP on [x, emb(t/T), emb(c)]."""

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, time_features: int = 64,
                 num_labels: int = NULL_CLASS + 1, num_train_timesteps: int = 1000):
        super().__init__()
        self.time_embedding = TimeFeatures(time_features, num_train_timesteps)
        self.label_embedding = nn.Embedding(num_labels, time_features)
        widths = [dim + 2 * time_features] + [hidden] * depth
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, dim))

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        h = torch.cat([x_t.float(), self.time_embedding(t), self.label_embedding(cond.long())], -1)
        return self.net(h)


# -------------------------------------------------------------------------------------------- training


def _draw_batch(mixture: GaussianMixture, schedule: Schedule, batch: int, generator: torch.Generator,
                null_fraction: float = 0.1) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x0, eps, x_t, t, labels): labels uniform on 0..3, a `null_fraction` of them dropped to NULL_CLASS."""
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    drop = torch.rand(batch, generator=generator) < null_fraction
    labels = labels.masked_fill(drop, NULL_CLASS)
    x0 = mixture.sample(labels, generator)
    eps = torch.randn(batch, 2, generator=generator)
    t = schedule.snap(torch.rand(batch, generator=generator) * schedule.num_train_timesteps)
    return x0, eps, schedule.add_noise(x0, eps, t), t, labels


def regression_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of raw outputs, summed over the 2 coordinates: each prediction type's own loss.

    Measured on the eps-prediction VP toy, this uniform weighting fit the exact teacher better (and gave
    better 50-step samples) than weighting the implied-x0 error by min(SNR, 1) or min(SNR, 5).
    """
    return ((output - target) ** 2).sum(-1).mean()


def _train(target_fn: Callable[..., Tensor], mixture: GaussianMixture, schedule: Schedule,
           steps: int, batch: int, seed: int, lr: float) -> ToyMLP:
    """Adam with cosine decay on `regression_loss` against target_fn(x0, eps, x_t, t, labels)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToyMLP(num_train_timesteps=schedule.num_train_timesteps)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x0, eps, x_t, t, labels = _draw_batch(mixture, schedule, batch, generator)
        with torch.no_grad():
            target = target_fn(x0, eps, x_t, t, labels)
        loss = regression_loss(model(x_t, t, labels), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
    return model.eval().requires_grad_(False)


def fit_to_teacher(teacher: ExactGMMDenoiser, schedule: Schedule, mixture: GaussianMixture,
                   steps: int = 2000, batch: int = 256, seed: int = 0, lr: float = 5e-3) -> ToyMLP:
    """Regress a ToyMLP onto the exact teacher's raw output (the init of student and fake score)."""
    return _train(lambda x0, eps, x_t, t, c: teacher(x_t, t, c), mixture, schedule, steps, batch, seed, lr)


def train_dsm(mixture: GaussianMixture, schedule: Schedule, prediction: PredictionType | str,
              steps: int = 2000, batch: int = 256, seed: int = 0, lr: float = 5e-3) -> ToyMLP:
    """A teacher trained by denoising score matching on mixture samples (10% labels dropped to NULL)."""
    prediction = PredictionType.parse(prediction)
    return _train(lambda x0, eps, x_t, t, c: from_x0_eps(x0, eps, t, schedule, prediction),
                  mixture, schedule, steps, batch, seed, lr)


@torch.no_grad()
def teacher_mismatch(model: nn.Module, teacher: ExactGMMDenoiser, schedule: Schedule,
                     mixture: GaussianMixture, num_samples: int = 4096, seed: int = 1) -> float:
    """`regression_loss` of `model` against the exact teacher on a fixed held-out batch."""
    _, _, x_t, t, labels = _draw_batch(mixture, schedule, num_samples, torch.Generator().manual_seed(seed))
    return regression_loss(model(x_t, t, labels), teacher(x_t, t, labels)).item()


# --------------------------------------------------------------------------------------------- metrics


def _in_mode(samples: Tensor, mixture: GaussianMixture) -> Tensor:
    """[N, M] bool: sample i lies within MODE_RADIUS_STDS stds of mode j."""
    dist = torch.cdist(samples.double(), mixture.means)
    return dist <= MODE_RADIUS_STDS * mixture.std


def mean_nll(samples: Tensor, labels: Tensor, mixture: GaussianMixture) -> float:
    """Mean -log p(x | label) of the samples (nats)."""
    return -mixture.log_prob(samples, labels).mean().item()


def in_mode_fraction(samples: Tensor, labels: Tensor, mixture: GaussianMixture) -> float:
    """Fraction of samples within 3 stds of one of their own label's modes."""
    own = mixture.membership[labels.long()]
    return (_in_mode(samples, mixture) & own).any(-1).double().mean().item()


def mode_coverage(samples: Tensor, labels: Tensor, mixture: GaussianMixture, min_share: float = 0.25) -> float:
    """Fraction of (label, owned mode) pairs, over the labels present, whose mode receives at least
    `min_share` of its expected count (#samples of the label / #owned modes) within 3 stds."""
    near = _in_mode(samples, mixture)
    covered, pairs = 0, 0
    for label in labels.unique().tolist():
        rows, own = labels == label, mixture.membership[label]
        counts = near[rows][:, own].sum(0)
        covered += int((counts >= min_share * rows.sum() / own.sum()).sum())
        pairs += int(own.sum())
    return covered / pairs


def conditional_energy_distance(samples: Tensor, reference: Tensor, labels: Tensor) -> float:
    """Energy distance between samples and reference of the same label, averaged over the labels present."""
    per_label = [energy_distance(samples[labels == c], reference[labels == c]) for c in labels.unique()]
    return sum(per_label) / len(per_label)


# -------------------------------------------------------------------------------------------- backbone


class GMMBackbone(Backbone):
    """The toy-gmm family: exact closed-form teacher ("exact") or a DSM-trained ToyMLP ("mlp").

    Labels are the conditions: uniform over 0..3 for training, NULL_CLASS for the unconditional branch.
    """

    name = "toy-gmm"
    time_embedding_module = "time_embedding"  # of ToyMLP, the student's and fake score's network
    sample_shape = (2,)
    metrics_description = ("`nll`: mean negative log-likelihood under the true mixture; `energy_distance`: to true "
                           "samples of the same labels; `mode_coverage`, `in_mode_fraction`: modes reached and "
                           "samples within 3 stds of their label's modes. The floor row scores true samples.")

    def __init__(self, teacher: str = "exact", schedule: Schedule | None = None,
                 prediction: PredictionType | str = "epsilon", seed: int = 0, fit_steps: int = 2000,
                 fit_batch: int = 256):
        if teacher not in ("exact", "mlp"):
            raise ValueError(f"toy-gmm teacher must be 'exact' or 'mlp', got {teacher!r}")
        self.mixture = GaussianMixture()
        self.schedule = schedule or DiscreteVP.from_betas("linear", 1000, 1e-4, 0.02)
        self.prediction = PredictionType.parse(prediction)
        self.seed, self.fit_steps, self.fit_batch = seed, fit_steps, fit_batch
        self.teacher_kind = teacher
        self._fitted: ToyMLP | None = None
        if teacher == "exact":
            self.teacher = ExactGMMDenoiser(self.mixture, self.schedule, self.prediction)
        else:
            self.teacher = train_dsm(self.mixture, self.schedule, self.prediction, fit_steps, fit_batch, seed)

    def initial_weights(self) -> nn.Module:
        """The teacher itself ("mlp"), or a ToyMLP fitted to the exact teacher (computed once, lazily)."""
        if self.teacher_kind == "mlp":
            return self.teacher
        if self._fitted is None:
            self._fitted = fit_to_teacher(self.teacher, self.schedule, self.mixture, self.fit_steps,
                                          self.fit_batch, self.seed)
        return self._fitted

    def sample_conditions(self, batch: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, NUM_CLASSES, (batch,), generator=generator, device=generator.device)

    def null_condition(self, batch: int) -> Tensor:
        return torch.full((batch,), NULL_CLASS, dtype=torch.long)

    def evaluation_conditions(self, num_samples: int) -> Tensor:
        return torch.arange(num_samples) % NUM_CLASSES

    def metrics(self, samples: Tensor, cond: Tensor) -> dict[str, float]:
        """NLL, per-label energy distance to true samples (seed REFERENCE_SEED), mode coverage, in-mode."""
        x, labels = samples.detach().cpu().float().reshape(-1, 2), cond.detach().cpu().long()
        reference = self.mixture.sample(labels, torch.Generator().manual_seed(REFERENCE_SEED))
        return {
            "nll": mean_nll(x, labels, self.mixture),
            "energy_distance": conditional_energy_distance(x, reference, labels),
            "mode_coverage": mode_coverage(x, labels, self.mixture),
            "in_mode_fraction": in_mode_fraction(x, labels, self.mixture),
        }

    def floor_metrics(self, num_samples: int, seed: int = 0) -> dict[str, float]:
        """`metrics` of true mixture samples on the evaluation conditions: the best a sampler can score."""
        if seed == REFERENCE_SEED:
            raise ValueError("floors need a seed other than REFERENCE_SEED (independent true sets)")
        labels = self.evaluation_conditions(num_samples)
        return self.metrics(self.mixture.sample(labels, torch.Generator().manual_seed(seed)), labels)
