"""Presets load, overrides apply, and every bad key or value is an error that names it."""

import pytest

from tdm.cli import main
from tdm.config import PRESET_DIR, ConfigError, from_dict, load_config, to_dict


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_loads_and_round_trips(preset):
    config = load_config(preset)
    assert from_dict(to_dict(config)) == config


def test_overrides_apply_with_types():
    c = load_config("digits-demo", ["train.iterations=7", "tdm.guidance_scale=3", "eval.student_steps=[1, 4]",
                                    "tdm.timesteps=[999, 856, 665, 399]"])
    assert c.train.iterations == 7 and c.tdm.guidance_scale == 3.0 and isinstance(c.tdm.guidance_scale, float)
    assert c.eval.student_steps == (1, 4) and c.tdm.timesteps == (999.0, 856.0, 665.0, 399.0)


@pytest.mark.parametrize("override, message", [
    ("train.iteratons=5", "unknown config key 'train.iteratons' (did you mean 'iterations'?)"),
    ("trian.iterations=5", "unknown config key 'trian' (did you mean 'train'?)"),
    ("train.iterations=five", "train.iterations: expected an integer"),
    ("train.iterations=2.5", "train.iterations: expected an integer"),
    ("tdm.guidance_scale=high", "tdm.guidance_scale: expected a number"),
    ("tdm.randmid=1", "tdm.randmid: expected true or false"),
    ("optim.betas=[0.9]", "optim.betas: expected a list of 2 values"),
    ("tdm.interval=sideways", "tdm.interval must be one of"),
    ("tdm.num_steps=0", "tdm.num_steps must be >= 1"),
    ("tdm.timesteps=[999, 500]", "tdm.timesteps has 2 entries but tdm.num_steps is 4"),
    ("train", "--set expects group.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("digits-demo", [override])
    assert message in str(err.value)


def test_string_fields_keep_yaml_keywords_from_the_command_line(tmp_path):
    assert load_config("toy-gmm", ["tdm.importance_weight=off"]).tdm.importance_weight == "off"
    assert load_config("toy-gmm", ["optim.generator_lr=1e-5"]).optim.generator_lr == 1e-5
    preset = tmp_path / "p.yaml"
    preset.write_text("tdm:\n  importance_weight: off\n")
    with pytest.raises(ConfigError, match="tdm.importance_weight: expected a string, got False .*quote the value"):
        load_config(str(preset))


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'digit-demo' \\(did you mean 'digits-demo'"):
        load_config("digit-demo")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_cli_reports_config_errors_in_one_line(capsys, tmp_path):
    code = main(["distill", "--config", "digits-demo", "--set", "train.batchsize=4", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tdm: error: unknown config key 'train.batchsize'")
    assert "Traceback" not in err and not (tmp_path / "r").exists()


def test_one_number_for_eval_teacher_steps_sets_the_reference_and_keeps_the_four_step_row():
    """eval.teacher_steps is the list of teacher rows (the first is the reference); a single number, as presets,
    old checkpoints and `--set eval.teacher_steps=N` give it, keeps the 4-step row the report always had."""
    from tdm.config import EvalConfig

    assert EvalConfig().teacher_steps == (50, 4)
    assert load_config("digits-demo", ["eval.teacher_steps=5"]).eval.teacher_steps == (5, 4)
    assert load_config("digits-demo", ["eval.teacher_steps=[6]"]).eval.teacher_steps == (6,)
    assert from_dict({"eval": {"teacher_steps": 25}}).eval.teacher_steps == (25, 4)
    with pytest.raises(ConfigError, match="eval.teacher_steps needs at least one value"):
        load_config("digits-demo", ["eval.teacher_steps=[]"])


def test_evaluate_flags_are_the_fields_of_its_options_with_the_reports_defaults():
    """`tdm evaluate` flags come from EvaluateOptions, whose shared fields are the `eval` group's."""
    import dataclasses

    from tdm.cli import build_parser
    from tdm.config import EvalConfig
    from tdm.evaluate.options import EvaluateOptions
    from tdm.flags import from_flags

    args = build_parser().parse_args(["evaluate", "run", "--out", "o"])
    options = from_flags(EvaluateOptions, args)
    assert options == EvaluateOptions()
    shared = [f.name for f in dataclasses.fields(EvalConfig)]
    assert {n: getattr(options, n) for n in shared} == dataclasses.asdict(EvalConfig())
    args = build_parser().parse_args(["evaluate", "run", "--out", "o", "--teacher-steps", "25", "--seed", "3",
                                      "--preference", "hpsv2", "--features", "none"])
    options = from_flags(EvaluateOptions, args)
    assert (options.teacher_steps, options.seed, options.preference, options.features) == ((25,), 3, ("hpsv2",),
                                                                                           "none")
