"""Typed configuration: frozen dataclass groups, YAML presets, `--set group.key=value` overrides, clear errors.

A preset is a YAML file in `configs/` whose top-level keys are the groups below; anything left out keeps
its default. Every error names the offending key and says what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import signal
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .core.algorithm import TDMConfig
from .errors import ConfigError

PRESET_DIR = Path(__file__).parent / "configs"

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "digits"  # teacher family, a key of tdm.registry:
                          # toy-gmm | digits | sd15 | sdxl | pixart-alpha | sd3 | cogvideox | flux | flux2-klein |
                          # wan | qwen-image | z-image | diffusers-denoiser,
                          # or your own: an import path module:Name of a Backbone subclass or a factory returning
                          # one (called with this config group), or an installed `tdm.backbones` entry point
    teacher: str = ""     # where the teacher comes from; "" = the family's default. toy-gmm: exact | mlp;
                          # digits: path to a teacher .safetensors ("" = the shipped one);
                          # diffusers families (required): a hub id or a local folder of the stock pipeline;
                          # diffusers-denoiser (required): a UNet2DModel / DiTTransformer2DModel save_pretrained
                          # folder, or a pipeline folder holding one (unet/ or transformer/, scheduler/, vae/)
    scheduler: str = ""   # diffusers-denoiser: the teacher's scheduler_config.json (or a folder holding one);
                          # "" = the one next to the network
    prediction: str = ""  # toy-gmm only: epsilon | v_prediction | sample | flow ("" = the family's default)
    # ---- diffusers families only ----
    prompts: str = ""          # training prompts (tdm.data.load_prompts): a .txt file (one per line), a .jsonl /
                               # .csv / .parquet table, or a folder of such files or a `datasets.save_to_disk` one
    prompt_column: str = ""    # the prompt column of a table; "" = the first of prompt, caption, text
    keep_duplicate_prompts: bool = False  # keep repeated prompts (drawn more often); default: keep the first only
    negative_prompt: str = ""  # unconditional prompt of the teacher's CFG ("" = the pipeline's default:
                               # the empty prompt; SDXL: zero embeddings)
    prompt_cache: str = ""     # folder of the text-embedding cache (tdm cache-prompts writes it; misses are encoded
                               # into it on first use, then the text encoders are released); "" = encode in memory
    height: int = 0            # sample size in pixels; 0 = the model's native size (e.g. 512 for SD1.5)
    width: int = 0
    frames: int = 0            # cogvideox, wan: frames per video in pixel space; 0 = the model's default (49; 81)
    dtype: str = "float32"     # weights of the frozen parts (teacher network, text encoders, VAE):
                               # float32 | bfloat16 | float16. Trained weights are float32 whatever this is
                               # (separate copies, LoRA adapters, the EMA): a bf16 weight loses lr-1e-6 updates
    text_encoder_3: bool = True  # sd3: load the T5 text encoder; false = the two CLIP encoders only
    embedded_guidance: float = 0.0  # flux: the value a guidance-distilled teacher's guidance embedding gets (teacher,
                                    # student and fake score alike; the export's guidance_scale); 0 = the pipeline's
                                    # default (FluxPipeline: 3.5)
    gradient_checkpointing: bool = False  # diffusers families: recompute the network's blocks in the backward pass
                                          # (less activation memory, about a third more time per iteration)

    def __post_init__(self):
        _require(self.dtype in DTYPES, f"backbone.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        for key in ("height", "width", "frames", "embedded_guidance"):
            _require(getattr(self, key) >= 0, f"backbone.{key} must be >= 0 (0 = the model's default), "
                                              f"got {getattr(self, key)}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("adamw", "adamw8bit")
MIXED_PRECISIONS = ("", "no", "fp16", "bf16")


@dataclass(frozen=True)
class OptimConfig:
    generator_lr: float = 1e-5
    fake_lr: float = 5e-5                     # method.md: 5 x the generator's
    betas: tuple[float, float] = (0.0, 0.95)  # AdamW betas of both roles (official code; paper: (0, 0.999))
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0                # generator gradient clipping (0 = off)
    warmup_steps: int = 0                     # linear generator-lr warm-up (every schedule)
    lr_scheduler: str = "constant"            # both roles' lr over the run (diffusers.optimization.get_scheduler):
                                              # constant | constant_with_warmup | linear | cosine |
                                              # cosine_with_restarts | polynomial; length: train.iterations at the
                                              # run's first start (kept on resume)
    lr_num_cycles: int = 1                    # cosine_with_restarts: hard restarts
    lr_power: float = 1.0                     # polynomial: power of the decay
    optimizer: str = "adamw"                  # adamw (torch) | adamw8bit (bitsandbytes' 8-bit AdamW; needs it
                                              # installed: pip install bitsandbytes)
    fake_updates: int = 1                     # fake-score updates per generator update
    fresh_fake_rollouts: bool = False         # each further fake update on a new student rollout (DMD2), not
                                              # the generator's (docs/fake_rollouts.md)

    def __post_init__(self):
        _require(self.generator_lr > 0 and self.fake_lr > 0, "optim.generator_lr and optim.fake_lr must be > 0")
        _require(all(0 <= b < 1 for b in self.betas), f"optim.betas must lie in [0, 1), got {self.betas}")
        _require(self.weight_decay >= 0 and self.max_grad_norm >= 0 and self.warmup_steps >= 0,
                 "optim.weight_decay, optim.max_grad_norm and optim.warmup_steps must be >= 0")
        _require(self.fake_updates >= 1, f"optim.fake_updates must be >= 1, got {self.fake_updates}")
        _require(self.lr_scheduler in LR_SCHEDULERS, f"optim.lr_scheduler must be one of "
                 f"{', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        _require(self.lr_num_cycles >= 1, f"optim.lr_num_cycles must be >= 1, got {self.lr_num_cycles}")
        _require(self.lr_power > 0, f"optim.lr_power must be > 0, got {self.lr_power}")
        _require(self.optimizer in OPTIMIZERS, f"optim.optimizer must be one of {', '.join(OPTIMIZERS)}, "
                 f"got {self.optimizer!r}")


GENERATOR_FORWARDS = ("rollout", "recompute")


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 1000
    batch_size: int = 64          # per process
    seed: int = 0
    ema_decay: float = 0.0        # EMA of the student; 0 = off
    mixed_precision: str = ""     # no | fp16 | bf16; "" = accelerate's (`accelerate launch --mixed_precision`
                                  # or its config file; plain python: no). A value here wins over accelerate's
    gradient_accumulation_steps: int = 1  # micro-batches of batch_size per update of each role (tdm.accumulation)
    log_every: int = 10           # scalars to the trackers and the progress bar
    report_to: str = "tensorboard"  # trackers (accelerate's log_with): tensorboard | wandb | comet_ml | mlflow |
                                  # aim | clearml | dvclive | swanlab | trackio, comma-separated, or all | none
    eval_every: int = 0           # sample grid and toy metrics; 0 = off
    validation_every: int = 0     # image backbones: a grid of the student's samples on validation_prompts (fixed
                                  # noise) every N iterations, to the trackers and validation/step_*.png; 0 = off
    validation_prompts: tuple[str, ...] = ()  # prompts of that grid (diffusers teachers); () = the first
                                  # validation_samples training prompts
    validation_samples: int = 4   # samples in the grid when validation_prompts is () (and for prompt-free teachers)
    eval_samples: int = 100
    checkpoint_every: int = 0     # 0 = only at the end
    keep_checkpoints: int = 3     # newest complete checkpoints kept; 0 = keep all
    stop_signals: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1")  # checkpoint after this iteration, exit 0
    max_nonfinite: int = 10       # consecutive skipped updates (non-finite loss or gradient) before aborting
    fp32_signal: bool = False     # generator step: teacher and fake score forwards with autocast off, so float32
                                  # weights compute their x0 difference in float32 (under mixed_precision=bf16 its
                                  # rounding error is ~0.5x the difference itself: benchmarks/bf16_signal.py)
    roles: str = "separate"       # separate: full float32 copies of student and fake score (also on a bf16/fp16
                                  # backbone.dtype); lora: two float32 LoRA adapters on the one frozen teacher
                                  # network (one copy of the backbone in memory)
    lora_rank: int = 16           # roles=lora: rank r of both adapters
    lora_alpha: float = 16.0      # roles=lora: LoRA scale alpha / r
    lora_targets: tuple[str, ...] = ()  # roles=lora: layers to adapt, module-name patterns (a name or its tail
                                  # after a dot) or groups attention | feedforward | conv; () = the backbone's default
    threads: int = 0              # torch CPU threads (CPU runs only); 0 = adapt to the cores other processes leave
                                  # free, up to torch's default (tdm.cpu_threads), unless OMP_NUM_THREADS is set
    generator_forward: str = "rollout"  # the generator step's differentiable student forward: "rollout" takes it
                                  # from the rollout (no forward computed twice; the student's activations are held
                                  # through the fake-score update); "recompute" recomputes it after that update
                                  # (lower peak memory, about 0.6 forward more per iteration at K = 4)
    compile: bool = False         # torch.compile the networks the roles call (in place: checkpoints unchanged);
                                  # needs a C++ compiler on CPU, triton on CUDA

    def __post_init__(self):
        for name in ("iterations", "batch_size", "log_every", "eval_samples", "max_nonfinite",
                     "gradient_accumulation_steps", "validation_samples"):
            _require(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "keep_checkpoints", "threads", "validation_every"):
            _require(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        _require(0 <= self.ema_decay < 1, f"train.ema_decay must lie in [0, 1), got {self.ema_decay}")
        unknown = [n for n in self.stop_signals if not hasattr(signal, n)]
        _require(not unknown, f"train.stop_signals: unknown signal names {unknown} (e.g. SIGTERM, SIGINT, SIGUSR1)")
        _require(self.mixed_precision in MIXED_PRECISIONS, f"train.mixed_precision must be one of no, fp16, bf16 "
                 f"or \"\" (accelerate's setting), got {self.mixed_precision!r}")
        _require(all(p.strip() for p in self.validation_prompts),
                 f"train.validation_prompts: entries must be non-empty prompts, got {list(self.validation_prompts)}")
        _require(self.roles in ("separate", "lora"), f"train.roles must be separate or lora, got {self.roles!r}")
        _require(self.generator_forward in GENERATOR_FORWARDS, f"train.generator_forward must be one of "
                 f"{', '.join(GENERATOR_FORWARDS)}, got {self.generator_forward!r}")
        _require(self.lora_rank >= 1, f"train.lora_rank must be >= 1, got {self.lora_rank}")
        _require(self.lora_alpha > 0, f"train.lora_alpha must be > 0, got {self.lora_alpha}")
        _require(all(t.strip() for t in self.lora_targets),
                 f"train.lora_targets: entries must be non-empty module-name patterns, got {list(self.lora_targets)}")


def setting(default, help: str, **flag):
    """A field of a settings group whose help text (and argparse `metavar` / `choices` in `flag`) a command line
    derives its flag from (tdm.flags). A tuple field with `first_from_one=True` also takes one number (YAML,
    `--set`): it replaces the first entry of the default and keeps the rest."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings shared by the end-of-run report (the `eval` group) and `tdm evaluate` (its flags:
    tdm.evaluate.options adds the command's own)."""
    num_samples: int = setting(1000, "samples per sampler, balanced over the evaluation conditions")
    # eval.num_samples = 0: no end-of-run report
    teacher_steps: tuple[int, ...] = setting((50, 4), "teacher DDIM step counts, with the run's CFG; the first is "
                                             "the FD / KID reference", first_from_one=True)
    # in YAML or --set one number (as before lists) sets the reference and keeps the 4-step row
    student_steps: tuple[int, ...] = setting((1, 2, 4, 8), "step counts the student (trained at its K) is "
                                                           "sampled at")
    seed: int = setting(1234, "noise seed of every row (reference teacher: seed + 1)")

    def __post_init__(self):
        _require(self.num_samples >= 0, f"eval.num_samples must be >= 0, got {self.num_samples}")
        _require(len(self.teacher_steps) > 0, "eval.teacher_steps needs at least one value (the reference)")
        _require(all(k >= 1 for k in self.teacher_steps + self.student_steps),
                 "eval.teacher_steps and eval.student_steps must be >= 1")


@dataclass(frozen=True)
class RewardConfig:
    """Reward post-training (`tdm reward`, docs/reward.md): TDM-R1 on a distilled student. Unused by `tdm distill`."""
    name: str = ""                # a reward of tdm.rewards (e.g. digits-confident) or module:function; "" = none
    options: str = ""             # the built-in reward's options, "key=value,key=value" (e.g. threshold=0.999)
    group_size: int = 8           # G: samples per condition; train.batch_size must be a multiple of it
    weight: float = 1.0           # lambda_R: the reward term's weight in the generator loss
    regulariser_weight: float = 1.0  # weight of TDM's generator loss (the distribution-matching regulariser); 0 = off
    guidance: float = 1.0         # w_R: the surrogate's own CFG in the reward direction (the code: 2.5-4.5)
    beta_dpo: float = 1.0         # the group preference loss's scale of the implicit reward
    beta: float = 0.001           # the surrogate's pull towards the base: beta * mean (out - base out)^2
    tau_min: float = 250.0        # lowest level the generator queries the surrogate at (time-axis units)
    tau_min_surrogate: float = 300.0  # lowest level the surrogate trains at
    tau_max: float = 1000.0       # highest level of both (capped at the student's noisiest level t_K): the x0
                                  # difference that gives the reward direction grows like sigma / alpha there
    trunc_steps: int = 0          # the reward term acts on the trunc_steps noisiest student steps; 0 = all
    drift_threshold: float = 0.05  # trust region: a sample whose surrogate drift mean (out - base out)^2 exceeds it
                                  # and whose implicit reward already has A's sign gets no gradient (the code's
                                  # reg_threshold); 0 = off
    lr: float = 1e-4              # the surrogate's learning rate (its optimiser: optim.optimizer, betas, decay)
    max_grad_norm: float = 1.0    # the surrogate's gradient clipping (0 = off)
    advantage_std: str = "global"  # global | group: the std advantages are divided by
    advantage_clip: float = 5.0
    fd_bound: float = 0.0         # warn when the reward rises while FD to the teacher's samples exceeds this;
                                  # 0 = twice the FD of the starting student

    def __post_init__(self):
        _require(self.group_size >= 2, f"reward.group_size must be >= 2, got {self.group_size}")
        for name in ("weight", "regulariser_weight", "beta", "tau_min", "tau_min_surrogate", "trunc_steps",
                     "drift_threshold", "max_grad_norm", "fd_bound"):
            _require(getattr(self, name) >= 0, f"reward.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("guidance", "beta_dpo", "lr", "advantage_clip"):
            _require(getattr(self, name) > 0, f"reward.{name} must be > 0, got {getattr(self, name)}")
        _require(self.tau_max > max(self.tau_min, self.tau_min_surrogate),
                 f"reward.tau_max ({self.tau_max}) must exceed reward.tau_min and reward.tau_min_surrogate")
        _require(self.advantage_std in ("global", "group"),
                 f"reward.advantage_std must be global or group, got {self.advantage_std!r}")

    def reward_options(self) -> dict:
        """reward.options as keyword arguments, each value read as YAML (numbers, booleans, strings)."""
        out = {}
        for item in filter(None, (part.strip() for part in self.options.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"reward.options: expected key=value[,key=value], got {item!r}")
            out[key.strip()] = yaml.safe_load(value.strip())
        return out


@dataclass(frozen=True)
class Config:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    tdm: TDMConfig = field(default_factory=TDMConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self):
        _require(not self.train.fp32_signal or self.backbone.dtype == "float32",
                 f"train.fp32_signal needs backbone.dtype=float32 (the teacher computes in its weights' dtype), "
                 f"got {self.backbone.dtype}")


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parsed(text: str, key: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse {text!r}: {err}") from None


def _coerce(value, tp, key: str):
    """Check and convert one value to the dataclass field type `tp`.

    Values from `--set` arrive as raw strings and are parsed as YAML unless the field is a string, so
    `--set tdm.importance_weight=off` stays the string 'off'.
    """
    if isinstance(value, str) and tp is not str:
        value = _parsed(value, key)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r} (YAML reads off/on/yes/no as booleans: "
                              f"quote the value)")
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def _first_from_one(f: dataclasses.Field, value, key: str):
    """One number for a `first_from_one` list field (tdm.config.setting): the default with its first entry replaced."""
    if not f.metadata.get("first_from_one"):
        return value
    value = _parsed(value, key) if isinstance(value, str) else value
    return value if isinstance(value, (list, tuple)) else [value, *f.default[1:]]


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}{_suggest(key, names)}; valid keys: {sorted(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{path}.")
        else:
            kwargs[key] = _coerce(_first_from_one(fields[key], value, path), tp, path)
    try:
        return cls(**kwargs)
    except ValueError as err:  # range checks in __post_init__
        raise ConfigError(str(err)) from None


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *groups, leaf = dotted.split(".")
    node = tree
    for g in groups:
        node = node.setdefault(g, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {g!r} is not a group")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, str]:
    """'train.iterations=200' -> ('train.iterations', '200'); the field's type decides how the value is read."""
    if "=" not in text:
        raise ConfigError(f"--set expects group.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip(), raw.strip()


def resolve_preset(name_or_path: str) -> Path:
    """A preset name from configs/ (e.g. 'digits-demo') or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name_or_path!r}{_suggest(name_or_path, names)}; presets: {names}")
    return preset


def _repeated_key(node: yaml.Node, prefix: str = "") -> tuple[str, int, int] | None:
    """(dotted key, first line, repeated line) of the first key given twice in one mapping, or None. Plain YAML
    keeps the last silently: a repeated group would drop the first one's keys."""
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in first:
                return f"{prefix}{key}", first[key], key_node.start_mark.line + 1
            first[key] = key_node.start_mark.line + 1
            found = _repeated_key(value_node, f"{prefix}{key}.")
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _repeated_key(item, prefix)
            if found:
                return found
    return None


def read_config_file(path: Path) -> dict:
    """The groups of a YAML config file, strictly: valid YAML, not empty, a mapping of groups each of which is a
    mapping, no key given twice. Errors name the file (and the key and line)."""
    groups = [f.name for f in dataclasses.fields(Config)]
    try:
        text = path.read_text()
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if root is None:
        raise ConfigError(f"{path}: the file is empty (expected a mapping of config groups: {', '.join(groups)})")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of config groups at the top level")
    repeated = _repeated_key(root)
    if repeated:
        key, first, line = repeated
        raise ConfigError(f"{path}:{line}: duplicate key {key!r} (first at line {first}); give each key once")
    for key_node, value_node in root.value:
        if not isinstance(value_node, yaml.MappingNode) and key_node.value in groups:
            raise ConfigError(f"{path}:{key_node.start_mark.line + 1}: {key_node.value}: expected a group of "
                              f"{key_node.value}.* keys (a mapping), got {tree[key_node.value]!r}")
    return tree


def load_config(preset: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the preset's YAML, then each `group.key=value` override, validated together."""
    tree = read_config_file(resolve_preset(preset)) if preset is not None else {}
    return from_dict(tree, overrides)


def to_dict(config: Config) -> dict:
    """Plain, YAML-safe nested dict (tuples become lists)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))


def from_dict(tree: dict, overrides: typing.Sequence[str] = ()) -> Config:
    """A config from a nested dict (e.g. a checkpoint's), then `group.key=value` overrides, validated together."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    return _build(Config, tree, "")
