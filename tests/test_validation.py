"""Validation grids during training: every real-model preset turns them on, and a tiny diffusers run writes them
as PNGs and TensorBoard images, with both losses on the progress bar."""

import json

import numpy as np
import pytest
from PIL import Image

from tdm.cli import main
from tdm.config import PRESET_DIR, load_config

REAL_MODEL_PRESETS = sorted(p.stem for p in [*PRESET_DIR.glob("*-lora.yaml"), *PRESET_DIR.glob("pixart*.yaml")])


@pytest.mark.parametrize("preset", REAL_MODEL_PRESETS)
def test_every_real_model_preset_validates_on_prompts_during_training(preset):
    train = load_config(preset).train
    assert 0 < train.validation_every <= 100 and len(train.validation_prompts) >= 2, preset


def test_validation_on_a_teacher_without_images_or_prompts_is_a_one_line_error(tmp_path, capsys):
    code = main(["distill", "--config", "toy-gmm", "--out", str(tmp_path / "a"), "--set", "train.validation_every=5"])
    assert code == 2 and "train.validation_every: the toy-gmm teacher makes no images" in capsys.readouterr().err
    code = main(["distill", "--config", "digits-demo", "--out", str(tmp_path / "b"),
                 "--set", "train.validation_every=5", "--set", "train.validation_prompts=[a cat]"])
    assert code == 2 and "train.validation_prompts: the digits teacher takes no text prompts" in \
        capsys.readouterr().err


def test_a_tiny_pixart_run_writes_validation_grids_to_png_and_tensorboard(tiny_dirs, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tiny_diffusers import PROMPTS, TINY_SIZE, cli_sets, tiny_overrides

    prompts_file = tiny_dirs["pixart-alpha"].parent / "prompts.txt"  # the training prompts tiny_overrides names
    if not prompts_file.exists():
        prompts_file.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "run"
    code = main(["distill", "--config", "pixart-alpha-512", "--out", str(out), "--no-report",
                 *cli_sets(tiny_overrides("pixart-alpha", tiny_dirs)), "--set", "train.validation_every=1",
                 "--set", "train.checkpoint_every=0"])
    assert code == 0, capsys.readouterr().err
    prompts = load_config("pixart-alpha-512").train.validation_prompts
    assert (out / "validation" / "prompts.txt").read_text().splitlines() == list(prompts)
    size = TINY_SIZE["pixart-alpha"]
    grids = [np.asarray(Image.open(out / "validation" / f"step_000000{s}.png")) for s in (1, 2)]
    for grid in grids:  # one row of 4 samples, 1-pixel borders
        assert grid.shape == (size + 2, 4 * (size + 1) + 1, 3) and grid.std() > 0
    assert not np.array_equal(*grids)  # the student moved between iterations (same prompts and noise)
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in events.Images("validation/samples")] == [1, 2]
    assert "generator_loss=" in capsys.readouterr().err  # the progress bar shows both losses
    assert json.loads((out / "launch.json").read_text())["trackers"] == ["tensorboard"]
