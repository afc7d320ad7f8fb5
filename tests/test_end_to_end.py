"""Whole distillations through the CLI: toy-gmm beats its teacher's 4-step DDIM; the demo writes its report."""

import json

from tdm.cli import main


def test_toy_gmm_student_beats_the_teachers_four_step_ddim(tmp_path):
    """The exact-teacher toy, shortened: the 4-step student must beat 4-step DDIM of the exact teacher."""
    code = main(["distill", "--config", "toy-gmm", "--out", str(tmp_path), "--set", "train.iterations=500",
                 "--set", "train.eval_every=0", "--set", "eval.student_steps=[4]", "--set", "eval.num_samples=2000",
                 "--set", "train.batch_size=256", "--set", "optim.fake_updates=1"])
    assert code == 0
    rows = {r["sampler"]: r for r in json.loads((tmp_path / "metrics.json").read_text())["rows"]}
    student, teacher4 = rows["student4"], rows["teacher4"]
    assert student["energy_distance"] < 0.5 * teacher4["energy_distance"], (student, teacher4)
    assert student["in_mode_fraction"] > teacher4["in_mode_fraction"]
    assert student["nll"] < teacher4["nll"]


def test_demo_writes_its_report(tmp_path):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--set", "train.iterations=4", "--set", "train.batch_size=8",
                 "--set", "train.eval_every=2", "--set", "train.log_every=2", "--set", "eval.num_samples=40",
                 "--set", "eval.teacher_steps=5"])
    assert code == 0
    for name in ("report.md", "metrics.json", "samples.png", "quality.png", "curves.png", "history.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["sampler"] for r in metrics["rows"]] == ["teacher5", "teacher4", "student1", "student2", "student4",
                                                       "student8"]
    assert {"nfe", "fd_train", "fd_teacher5", "class_accuracy", "ms_per_sample",
            "kid_teacher5"} <= set(metrics["rows"][0])
    assert metrics["rows"][0]["nfe"] == 10 and metrics["rows"][4]["nfe"] == 4
    assert "fd_train" in metrics["floor"] and metrics["iterations"] == 4
    report = (out / "report.md").read_text()
    assert "| teacher, 5 DDIM steps, CFG 2 | 10 |" in report and "![samples](samples.png)" in report
    assert "## Diagnostics" in report and metrics["warnings"] == []
    history = json.loads((out / "history.json").read_text())
    logged = set().union(*history)
    assert {"student/x0_std", "eval/student_std", "eval/teacher_std", "eval/saturation", "fake/grad_norm"} <= logged
    assert any(k.startswith("generator/loss_k") for k in logged)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
