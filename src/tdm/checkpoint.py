"""Checkpoints: both trainable roles, both optimisers, EMA, step, RNG state and the resolved config.

Layout of `checkpoints/step_0000500/`: one `<role>.safetensors` per module (for train.roles=lora only that
role's LoRA weights, in peft's key format), `<name>.optim.safetensors` (+ `.json` for its non-tensor state) per
optimiser, `rng.safetensors` (one state per rank), and the manifest `state.json` (step, file sizes and sha256,
config digest, config, the fingerprint of the frozen base for LoRA roles, the run's TrainState), written last.
The folder is assembled under a temporary name, fsynced and renamed into place, so a crash never leaves a
half-written checkpoint under a real name; a folder without a complete manifest is never loaded. Damaged
checkpoints are never deleted or written over: they move to `checkpoints/damaged/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import TDMError
from .files import sha256_file

STATE_FILE = "state.json"
DAMAGED_DIR = "damaged"
RNG_FILE = "rng.safetensors"


class CheckpointError(TDMError, ValueError):
    """A checkpoint that cannot be loaded: incomplete, corrupted, or made for another model."""


class CheckpointCorrupted(CheckpointError):
    """A file's content differs from the hash its manifest recorded."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def _weights_file(name: str) -> str:
    return f"{name}.safetensors"


def holds_weights(manifest: dict, name: str) -> bool:
    """Whether the checkpoint of `manifest` holds the weights of module `name` (e.g. "student_ema")."""
    return _weights_file(name) in manifest["files"]


def _optimizer_to_files(optimizer: torch.optim.Optimizer | dict) -> tuple[dict, dict]:
    """Split an optimiser's state dict (or the state dict itself) into tensors (safetensors) and the rest (JSON)."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(root: Path, step: int, modules: dict[str, nn.Module | dict],
                    optimizers: dict[str, torch.optim.Optimizer | dict], rng: dict[str, torch.Tensor],
                    config: dict, base_fingerprint: str | None = None, trainer_state: dict | None = None) -> Path:
    """Write a checkpoint atomically under root/step_XXXXXXX and return its path. `base_fingerprint` names the
    frozen base that LoRA-only module weights belong to (tdm.roles.base_fingerprint); `trainer_state` is the
    run's progress as JSON (`TrainState.manifest_entry`, manifest key "trainer"). A module or optimiser may be
    given as its state dict (sharded training gathers them first on every rank)."""
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    try:
        return _write_checkpoint(root, tmp, final, step, modules, optimizers, rng, config, base_fingerprint,
                                 trainer_state)
    except (OSError, SafetensorError) as err:  # disk full, read-only target: earlier checkpoints stay intact
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {getattr(err, 'strerror', None) or err}") from None


def _write_checkpoint(root, tmp, final, step, modules, optimizers, rng, config, base_fingerprint,
                      trainer_state) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, module in modules.items():
        weights = module if isinstance(module, dict) else module.state_dict()
        state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        save_file(state, tmp / _weights_file(name))
    for name, optimizer in optimizers.items():
        tensors, meta = _optimizer_to_files(optimizer)
        save_file(tensors, tmp / f"{name}.optim.safetensors")
        (tmp / f"{name}.optim.json").write_text(json.dumps(meta))
    save_file({k: v.contiguous() for k, v in rng.items()}, tmp / RNG_FILE)
    _test_only_pause(step)
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    hashes = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    config_digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    manifest = {"step": step, "files": files, "sha256": hashes, "config_digest": config_digest, "config": config,
                "base_fingerprint": base_fingerprint, "trainer": trainer_state}
    (tmp / STATE_FILE).write_text(json.dumps(manifest, indent=1))
    for p in tmp.iterdir():  # flush file contents before the rename makes them visible
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving a step: a damaged copy is kept, out of the way
        try:
            verified_manifest(final)
        except CheckpointError as err:
            _set_aside(final, str(err))
    if final.exists():  # re-saving a step: move the old copy aside first, so one copy always exists
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def _test_only_pause(step: int) -> None:
    """Crash tests set TDM_TEST_PAUSE_IN_CHECKPOINT=STEP:SECONDS to kill a run while the checkpoint of STEP
    is half written (weights on disk, no manifest, not renamed)."""
    at, _, seconds = os.environ.get("TDM_TEST_PAUSE_IN_CHECKPOINT", "").partition(":")
    if at and int(at) == step:
        print(f"tdm-test: paused inside the checkpoint write of step {step}", file=sys.stderr, flush=True)
        time.sleep(float(seconds))


def is_complete(path: Path) -> bool:
    """A checkpoint counts only if its manifest exists and every listed file has the listed size."""
    state = path / STATE_FILE
    if not state.is_file():
        return False
    try:
        files = json.loads(state.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((path / n).is_file() and (path / n).stat().st_size == size for n, size in files.items())


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    return sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under root, or None."""
    candidates = complete_checkpoints(root)
    return candidates[-1] if candidates else None


def move_aside(path: Path) -> Path:
    """Move a damaged checkpoint folder to <root>/damaged/ (never over an earlier one there); return where."""
    folder = path.parent / DAMAGED_DIR
    folder.mkdir(exist_ok=True)
    dest, n = folder / path.name, 0
    while dest.exists():
        n += 1
        dest = folder / f"{path.name}.{n}"
    os.rename(path, dest)
    return dest


def _set_aside(path: Path, why: str) -> None:
    print(f"tdm: warning: {why}; moved {path} to {move_aside(path)}", file=sys.stderr)


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep = 0: keep all) and temporary folders left by
    killed writers (tdm's own half-writes); move incomplete step folders older than the newest complete one
    aside (move_aside): something other than tdm's writer damaged them."""
    for stale in [*root.glob(".step_*.tmp-*"), *root.glob(".step_*.old-*")]:
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    complete = complete_checkpoints(root)
    if complete:
        for p in root.glob("step_*"):
            if p.is_dir() and p not in complete and p.name < complete[-1].name:
                _set_aside(p, f"{p} has no complete {STATE_FILE}")
    if keep > 0:
        for old in complete[:-keep]:
            shutil.rmtree(old)


def read_manifest(path: Path) -> dict:
    """The manifest (step, files, hashes, resolved config) of a complete checkpoint."""
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete tdm checkpoint (missing or incomplete {STATE_FILE})")
    return json.loads((path / STATE_FILE).read_text())


def verified_manifest(path: Path) -> dict:
    """The manifest of a complete checkpoint whose files all have the sha256 it records."""
    manifest = read_manifest(path)
    for name, digest in manifest.get("sha256", {}).items():
        if sha256_file(path / name) != digest:
            raise CheckpointCorrupted(f"{path / name} is corrupted (its sha256 differs from {STATE_FILE})")
    return manifest


def load_checkpoint(path: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    base_fingerprint: str | None = None) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Verify hashes and the base the weights belong to, then load weights and optimiser states in place;
    return (step, rng tensors, config)."""
    manifest = verified_manifest(path)
    if manifest.get("base_fingerprint") != base_fingerprint:
        raise CheckpointError(f"{path} was trained on another base model (base_fingerprint "
                              f"{manifest.get('base_fingerprint')} in {STATE_FILE}, this run's: {base_fingerprint})")
    for name, module in modules.items():
        file = path / _weights_file(name)
        try:
            module.load_state_dict(load_file(file))
        except (RuntimeError, FileNotFoundError) as err:
            first = str(err).strip().splitlines()[0]
            raise CheckpointError(f"{file} does not match this run's {name}: {first}") from None
    for name, optimizer in optimizers.items():
        meta = json.loads((path / f"{name}.optim.json").read_text())
        optimizer.load_state_dict(_optimizer_from_files(load_file(path / f"{name}.optim.safetensors"), meta))
    return manifest["step"], load_file(path / RNG_FILE), manifest["config"]
