"""Training diagnostics: per-step losses, prediction statistics and the drift/collapse warnings."""

import torch

from tdm.diagnostics import PATIENCE, Diagnostics, per_step_losses, sample_statistics


def test_per_step_losses_average_each_step_index():
    loss = torch.tensor([1.0, 2.0, 3.0, 5.0])
    k = torch.tensor([1, 2, 1, 4])
    out = per_step_losses(loss, k, "generator")
    assert {name: float(v) for name, v in out.items()} == {"generator/loss_k1": 2.0, "generator/loss_k2": 2.0,
                                                           "generator/loss_k4": 5.0}


def test_sample_statistics_measure_spread_shift_and_saturation():
    teacher = torch.linspace(-1, 1, 1000)
    stats = sample_statistics(teacher * 1.5, teacher)
    assert abs(stats["eval/student_std"] / stats["eval/teacher_std"] - 1.5) < 1e-5
    assert abs(stats["eval/saturation"] - 1 / 3) < 0.01  # |1.5 x| > 1 on a third of [-1, 1]
    assert sample_statistics(teacher, teacher)["eval/saturation"] == 0.0


def _logs(student_std=1.0, student_mean=0.0, saturation=0.0):
    return {"eval/student_std": student_std, "eval/teacher_std": 1.0, "eval/student_mean": student_mean,
            "eval/teacher_mean": 0.0, "eval/saturation": saturation}


def test_warnings_need_patience_fire_once_and_again_after_clearing():
    d = Diagnostics()
    healthy, collapsed = _logs(), _logs(student_std=0.2)
    assert d.update(1, healthy) == []
    given = [d.update(step, collapsed) for step in range(2, 2 + PATIENCE + 3)]
    assert sum(len(g) for g in given) == 1 and "collapse" in given[PATIENCE - 1][0]
    d.update(20, healthy)
    again = [d.update(step, collapsed) for step in range(21, 21 + PATIENCE)]
    assert len(again[-1]) == 1 and [w["step"] for w in d.warnings] == [1 + PATIENCE, 20 + PATIENCE]


def test_each_condition_is_detected_and_healthy_runs_stay_quiet():
    for logs, condition in [(_logs(student_std=3.0), "scale drift"), (_logs(student_mean=0.8), "mean drift"),
                            (_logs(saturation=0.2), "saturation")]:
        d = Diagnostics()
        for step in range(PATIENCE):
            d.update(step, logs)
        assert [w["condition"] for w in d.warnings] == [condition]
    quiet = Diagnostics()
    for step in range(10):
        quiet.update(step, _logs(student_std=0.9, student_mean=0.1, saturation=0.01))
    assert quiet.update(10, {"fake/loss": 1.0}) == [] and quiet.warnings == []
