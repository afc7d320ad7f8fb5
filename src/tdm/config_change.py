"""What may change when a run resumes: the resumed config against the one its checkpoint's manifest recorded.

A resumed run must continue the run that wrote the checkpoint. Only the keys below may differ, because none of
them changes what an iteration computes: every iteration's draws come from (seed, rank, step) and its learning
rate from the step alone, so they decide only when the run ends, what is logged, evaluated and kept, or how
memory is traded for time. Any other difference is an error unless the user asks for it (--allow-config-change).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .config import Config, from_dict, to_dict
from .errors import ConfigError, TDMError

MAY_CHANGE_ON_RESUME = {
    "train.iterations": "where the run ends",
    "train.checkpoint_every": "when checkpoints are written (each is an exact copy of the state)",
    "train.keep_checkpoints": "how many old checkpoints stay on disk",
    "train.log_every": "what is logged",
    "train.eval_every": "when the student is sampled (with its own seeded noise, never the training draws)",
    "train.eval_samples": "how many samples those evaluations draw",
    "train.stop_signals": "which signals end the run with a checkpoint",
    "train.max_nonfinite": "how many skipped updates in a row abort the run",
    "train.report_to": "where scalars and images are logged",
    "train.validation_every": "when the validation grid is drawn (fixed prompts and noise, never the training draws)",
    "train.validation_prompts": "what the validation grid shows",
    "train.validation_samples": "what the validation grid shows",
    "eval.num_samples": "the end-of-run report's sampling",
    "eval.teacher_steps": "the end-of-run report's sampling",
    "eval.student_steps": "the end-of-run report's sampling",
    "eval.seed": "the end-of-run report's sampling",
    "backbone.gradient_checkpointing": "recomputes activations in the backward pass: memory for time",
    "train.threads": "how many CPU threads compute each op",
    "train.generator_forward": "recomputes the generator's student forward after the fake update: memory for time",
    "train.compile": "compiles the same computation (torch.compile): time for a start-up cost",
    "backbone.prompt_cache": "where text embeddings are cached (keyed by the text encoder's fingerprint)",
}


class ConfigChanged(TDMError):
    """The resumed run's config differs from its checkpoint's in keys that define the run."""


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_keys(saved: dict, config: Config) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for every key that differs and may not change on resume."""
    try:  # fills keys added to tdm since the checkpoint was written with their defaults
        saved = to_dict(from_dict(saved))
    except ConfigError:
        pass
    old, new = _flat(saved), _flat(to_dict(config))
    return [(k, old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and k not in MAY_CHANGE_ON_RESUME]


def check_config_change(checkpoint: Path, saved: dict, config: Config, allow: bool) -> None:
    """Raise ConfigChanged naming each changed key, or with `allow` print one warning naming them."""
    changes = changed_keys(saved, config)
    if not changes:
        return
    listing = ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in changes)
    if allow:
        print(f"tdm: warning: resuming {checkpoint} with a changed config (--allow-config-change): {listing}",
              file=sys.stderr)
        return
    raise ConfigChanged(f"--resume: this run changes the config of {checkpoint}: {listing}; only "
                        f"{', '.join(MAY_CHANGE_ON_RESUME)} may change on resume; pass --allow-config-change "
                        f"to continue with the new config")
