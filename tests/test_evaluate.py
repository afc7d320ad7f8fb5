"""`tdm evaluate` and its parts: FD and KID math, the Inception loader, CLIP score, reports, digits end to end."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tdm.cli import main
from tdm.errors import MissingModel, MissingPackage
from tdm.evaluate.features import (
    INCEPTION_FILE,
    InceptionFeatures,
    find_inception,
    load_preference_scorer,
)
from tdm.metrics import frechet_distance, frechet_distance_from_stats, kernel_distance, polynomial_mmd2

# ------------------------------------------------------------------------------------------------ metrics


def test_frechet_distance_with_full_covariances_matches_the_closed_form():
    # For 2 x 2 SPD matrices, Tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) with M = C1 C2 (non-commuting here).
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.0])
    c1, c2 = np.array([[2.0, 0.8], [0.8, 1.0]]), np.array([[0.5, -0.3], [-0.3, 1.5]])
    m = c1 @ c2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    assert frechet_distance_from_stats(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-10)
    # and from samples of those Gaussians, within the estimate's noise (about 0.02 at this size)
    g = np.random.default_rng(0)
    a = g.multivariate_normal(mu1, c1, size=200_000)
    b = g.multivariate_normal(mu2, c2, size=200_000)
    assert frechet_distance(a, b) == pytest.approx(expected, abs=0.07)


def _v_statistic_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The biased estimate (diagonals kept), for contrast with the unbiased one."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    return float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def test_polynomial_mmd2_matches_the_pairwise_definition():
    g = np.random.default_rng(1)
    x, y = g.normal(size=(6, 3)), g.normal(size=(6, 3)) + 0.3
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    m = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    assert polynomial_mmd2(x, y) == pytest.approx(within - 2 * cross, rel=1e-12)


def test_kid_of_point_masses_is_the_closed_form_with_no_spread():
    a, b = np.array([1.0, 0.0, 2.0]), np.array([0.0, 1.0, 1.0])
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    kid = kernel_distance(np.tile(a, (50, 1)), np.tile(b, (40, 1)), num_subsets=5, subset_size=30)
    assert kid.mean == pytest.approx(k(a, a) + k(b, b) - 2 * k(a, b), rel=1e-12)
    assert kid.std == pytest.approx(0.0, abs=1e-9) and kid.subset_size == 30


def test_kid_is_unbiased_where_the_v_statistic_is_not():
    g = np.random.default_rng(2)
    draws = [(g.normal(size=(40, 4)), g.normal(size=(40, 4))) for _ in range(400)]
    unbiased = np.array([polynomial_mmd2(x, y) for x, y in draws])
    biased = np.array([_v_statistic_mmd2(x, y) for x, y in draws])
    stderr = unbiased.std() / np.sqrt(len(draws))
    assert abs(unbiased.mean()) < 3 * stderr  # expectation 0 for one distribution
    assert biased.mean() > 10 * biased.std() / np.sqrt(len(draws))  # the diagonal biases the V-statistic up


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    g = np.random.default_rng(3)
    x = g.normal(size=(600, 8))
    twin, shifted = (kernel_distance(x, y, subset_size=300) for y in (g.normal(size=(600, 8)), x + 0.5))
    assert abs(twin.mean) < 2 * twin.std
    assert shifted.mean > 5 * shifted.std


def test_kid_of_identical_sets_is_the_closed_form_below_zero():
    # Whole-set subsets: 2 (off-diagonal mean - full mean) of K(x, x); each point also meets itself across sets.
    x = np.random.default_rng(4).normal(size=(50, 4))
    k = (x @ x.T / 4 + 1) ** 3
    off_diagonal = (k.sum() - np.trace(k)) / (50 * 49)
    kid = kernel_distance(x, x, num_subsets=3, subset_size=50)
    assert kid.mean == pytest.approx(2 * (off_diagonal - k.mean()), rel=1e-10)
    assert kid.mean < 0 and kid.std == pytest.approx(0, abs=1e-12)


def test_kid_rejects_features_of_different_width():
    with pytest.raises(ValueError, match="same D"):
        kernel_distance(np.zeros((5, 3)), np.zeros((5, 4)))


# ------------------------------------------------------------------------------------------ Inception


def test_inception_features_call_the_torchscript_net_on_8_bit_rgb(inception_file):
    extractor = InceptionFeatures(inception_file)
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    features = extractor(images)
    net = extractor.net
    expected = net((images * 255).round().expand(-1, 3, -1, -1), return_features=True)
    assert features.shape == (5, 16)
    torch.testing.assert_close(features, expected)
    # quantised like a saved PNG: a change below half an 8-bit level changes nothing
    torch.testing.assert_close(extractor((images * 255).round() / 255 + 0.4 / 255), features)
    assert extractor.name == "inception" and INCEPTION_FILE in extractor.description


def test_inception_is_found_through_the_env_var_and_the_cache(inception_file, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TDM_INCEPTION", str(inception_file))
    assert find_inception() == inception_file
    monkeypatch.delenv("TDM_INCEPTION")
    cached = tmp_path / "cache" / "tdm" / INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(inception_file.read_bytes())
    assert find_inception() == cached


def test_missing_inception_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("TDM_INCEPTION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingModel) as err:
        InceptionFeatures()
    message = str(err.value)
    for looked in (tmp_path / "cache" / "tdm" / INCEPTION_FILE, tmp_path / "torch" / "hub" / "checkpoints"):
        assert str(looked) in message
    assert "never downloads" in message and "nvlabs-fi-cdn.nvidia.com" in message and "--inception" in message
    with pytest.raises(MissingModel, match="elsewhere.pt"):
        InceptionFeatures(tmp_path / "elsewhere.pt")
    (tmp_path / "not_a_net.pt").write_bytes(b"not torchscript")
    with pytest.raises(MissingModel, match="not a TorchScript Inception network"):
        InceptionFeatures(tmp_path / "not_a_net.pt")


# ------------------------------------------------------------------------------------ CLIP and preference


def test_clip_score_is_100_times_the_clamped_cosine_of_each_pair(tiny_clip):
    from tdm.evaluate.clip_score import CLIPScorer, clip_pixels

    scorer = CLIPScorer(str(tiny_clip), batch_size=3)
    images = torch.rand(6, 3, 40, 32, generator=torch.Generator().manual_seed(1))
    prompts = ["a handwritten digit 1", "a cat", "a red car on a road", "a digit 7", "seven", "a dog"]
    cos = scorer.cosine(images, prompts)
    text = scorer.tokenizer(prompts, padding="max_length", max_length=32, return_tensors="pt")
    out = scorer.model(input_ids=text.input_ids, attention_mask=text.attention_mask,
                       pixel_values=clip_pixels(images, 24))
    torch.testing.assert_close(cos, out.logits_per_image.diagonal() / scorer.model.logit_scale.exp())
    torch.testing.assert_close(scorer.cosine(images[4:5], prompts[4:5]), cos[4:5])  # batching does not matter
    assert (cos < 0).any() and (cos > 0).any()  # both signs, so the clamp is exercised
    torch.testing.assert_close(scorer.clip_score(images, prompts), 100 * cos.clamp(min=0))
    name, pickscore = load_preference_scorer(f"pickscore={tiny_clip}")
    torch.testing.assert_close(pickscore(images, prompts), scorer.model.logit_scale.exp().item() * cos)


def test_clip_pixels_crop_the_centre_and_normalise():
    from tdm.evaluate.clip_score import CLIP_MEAN, CLIP_STD, clip_pixels

    grey = torch.rand(2, 1, 24, 24)
    expected = (grey.expand(-1, 3, -1, -1) - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(
        1, 3, 1, 1)
    torch.testing.assert_close(clip_pixels(grey, 24), expected)  # already the right size: only normalised
    wide = torch.zeros(1, 3, 24, 48)
    wide[..., 12:36] = 1.0  # the centre square is white, the sides black
    assert clip_pixels(wide, 24).shape == (1, 3, 24, 24)
    torch.testing.assert_close(clip_pixels(wide, 24), clip_pixels(torch.ones(1, 3, 24, 24), 24))


def test_missing_clip_model_and_preference_packages_are_named(tmp_path):
    from tdm.evaluate.clip_score import CLIPScorer

    with pytest.raises(MissingModel, match="cannot load a CLIP model"):
        CLIPScorer(str(tmp_path / "no-such-clip"))
    with pytest.raises(MissingPackage, match="pip install hpsv2"):
        load_preference_scorer("hpsv2")
    with pytest.raises(MissingPackage, match="pip install image-reward"):
        load_preference_scorer("imagereward")
    with pytest.raises(Exception, match="unknown scorer 'aesthetic'"):
        load_preference_scorer("aesthetic")


# -------------------------------------------------------------------------------------------- reports


def test_comparison_report_writes_its_files_and_table(tmp_path):
    from tdm.evaluate.comparison_report import write_comparison
    from tdm.toys.digits import DigitsBackbone

    backbone = DigitsBackbone()
    rows = [{"sampler": name, "label": label, "kind": kind, "steps": nfe, "nfe": nfe, "fd_teacher50": fd,
             "kid_teacher50": kid, "kid_teacher50_std": 0.01, "class_accuracy": 1.0, "ms_per_sample": nfe * 0.1,
             "samples_per_s": 100.0 / nfe}
            for name, label, kind, nfe, fd, kid in (("teacher50", "teacher, 50 steps", "teacher", 100, 1.8, 0.001),
                                                    ("dmd1", "DMD-style, 1 step", "baseline", 1, 500.0, 2.0),
                                                    ("student4", "student, 4 steps", "student", 4, 7.4, 0.05))]
    samples = {r["sampler"]: torch.rand(12, 1, 8, 8) * 2 - 1 for r in rows}
    result = {"rows": rows, "samples": samples, "floor": {"class_accuracy": 0.98}, "reference": "teacher50",
              "features": {"name": "digits-classifier"}}
    table, figures = write_comparison(tmp_path, result, backbone, grid_columns=10)
    assert {p.name for p in tmp_path.iterdir()} == {"metrics.json", "samples.png", "quality.png"}
    assert "samples" not in json.loads((tmp_path / "metrics.json").read_text())
    assert "| student, 4 steps | 4 | 7.4 | 0.05 ± 0.01 | 1 | 0.4 | 25 |" in table[0]
    assert "| real data (floor) |  |  |  | 0.98 |" in table[0]
    assert "![samples](samples.png)" in figures and "![quality against cost](quality.png)" in figures
    from PIL import Image

    width, height = Image.open(tmp_path / "samples.png").size
    assert width > 2 * height  # 3 rows of 10 images: a wide grid


# ---------------------------------------------------------------------------------- digits, end to end


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """A 4-step student and a 1-step (DMD-style) baseline, two iterations each."""
    root = tmp_path_factory.mktemp("runs")
    for name, k in (("k4", 4), ("k1", 1)):
        assert main(["distill", "--config", "digits-demo", "--out", str(root / name), "--no-report",
                     "--set", "train.iterations=2", "--set", "train.batch_size=8", "--set", "train.eval_every=0",
                     "--set", f"tdm.num_steps={k}"]) == 0
    return root


def test_evaluate_on_the_digits_toy_writes_the_comparison(digits_runs, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", str(digits_runs / "k4"), "--baseline", str(digits_runs / "k1"), "--out", str(out),
                 "--teacher-steps", "10", "4", "--student-steps", "1", "2", "4", "8", "--num-samples", "30",
                 "--latency-repeats", "1"])
    assert code == 0
    assert {"report.md", "metrics.json", "samples.png", "quality.png"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["rows"]
    assert [r["sampler"] for r in rows] == ["teacher10", "teacher4", "dmd1", "student1", "student2", "student4",
                                            "student8"]
    assert [r["nfe"] for r in rows] == [20, 8, 1, 1, 2, 4, 8]
    assert {"fd_teacher10", "kid_teacher10", "kid_teacher10_std", "fd_train", "class_accuracy", "latency_ms",
            "ms_per_sample", "samples_per_s"} <= set(rows[0])
    assert rows[0]["fd_teacher10"] < rows[3]["fd_teacher10"]  # the teacher is closer to itself than 1 bad step
    assert metrics["student"]["weights"] == "student_ema" and metrics["baseline"]["num_steps"] == 1
    assert metrics["features"]["name"] == "digits-classifier"
    printed = capsys.readouterr().out
    assert "| teacher, 10 DDIM steps, CFG 2 | 20 |" in printed
    assert "| DMD-style baseline (TDM K=1), 1 step | 1 |" in printed
    report = (out / "report.md").read_text()
    assert "| student, 8 steps | 8 |" in report and "![samples](samples.png)" in report


def test_evaluate_with_inception_reference_images_and_clip(digits_runs, inception_file, tiny_clip, tmp_path):
    from PIL import Image

    from tdm.toys.digits import load_digits_split

    refs = tmp_path / "refs"
    refs.mkdir()
    for i, img in enumerate(load_digits_split()[2][:12]):
        Image.fromarray(((img[0] + 1) * 127.5).round().byte().numpy()).save(refs / f"{i}.png")
    out = tmp_path / "eval"
    code = main(["evaluate", str(digits_runs / "k4" / "checkpoints" / "step_0000002"), "--out", str(out),
                 "--teacher-steps", "4", "--student-steps", "2", "--num-samples", "12", "--latency-repeats", "0",
                 "--features", "inception", "--inception", str(inception_file), "--reference-dir", str(refs),
                 "--clip-model", str(tiny_clip)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["features"]["file"] == str(inception_file) and len(metrics["features"]["sha256"]) == 64
    for row in metrics["rows"]:
        assert {"fd_teacher4", "kid_teacher4", "fd_reference", "kid_reference", "clip_score"} <= set(row)
        assert 0 <= row["clip_score"] <= 100 and "latency_ms" not in row


def test_evaluate_refuses_bad_input_in_one_line(digits_runs, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere is neither a complete tdm checkpoint nor a run folder" in capsys.readouterr().err
    assert main(["evaluate", str(digits_runs / "k4"), "--out", str(tmp_path / "o"), "--features", "inception",
                 "--inception", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["evaluate", str(digits_runs / "k4"), "--out", str(tmp_path / "o"), "--reference-dir",
                 str(tmp_path)]) == 2
    assert "no images" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_ctrl_c_during_evaluate_is_one_line_and_writes_nothing(digits_runs, tmp_path):
    """SIGINT in the middle of a long evaluation: exit code 130 (128 + SIGINT), one line, no traceback, no files."""
    out = tmp_path / "eval"
    start = "import sys, tdm.cli; print('ready', flush=True); sys.exit(tdm.cli.main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", start, "evaluate", str(digits_runs / "k4"), "--out", str(out),
                             "--num-samples", "200000", "--latency-repeats", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,  # Ctrl-C reaches it as from a shell, even where
                            # this process ignores SIGINT (an ignored signal is inherited across exec)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "ready"  # imports done: main() is running
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("tdm:")] == [
        "tdm: interrupted: tdm evaluate stopped by Ctrl-C; files are written complete or not at all"]
    assert not out.exists()


def test_evaluate_on_a_tiny_sd_model_with_inception_and_clip(tiny_dirs, inception_file, tiny_clip, tmp_path):
    """The same command on a diffusers teacher (a tiny SD1.5 pipeline, LoRA roles, random weights), offline."""
    pytest.importorskip("diffusers")
    from tiny_diffusers import PROMPTS, cli_sets, tiny_overrides

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    run = tmp_path / "run"
    overrides = [*tiny_overrides("sd15", tiny_dirs), f"backbone.prompts={prompts}", "train.checkpoint_every=0"]
    assert main(["distill", "--config", "sd15-lora", "--out", str(run), "--no-report", *cli_sets(overrides)]) == 0
    out = tmp_path / "eval"
    code = main(["evaluate", str(run), "--out", str(out), "--teacher-steps", "4", "2", "--student-steps", "1", "2",
                 "--num-samples", "6", "--latency-repeats", "1", "--features", "inception", "--inception",
                 str(inception_file), "--clip-model", str(tiny_clip)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["sampler"] for r in metrics["rows"]] == ["teacher4", "teacher2", "student1", "student2"]
    assert [r["nfe"] for r in metrics["rows"]] == [8, 4, 1, 2]  # the sd15-lora preset's CFG doubles teacher calls
    for row in metrics["rows"]:
        assert {"fd_teacher4", "kid_teacher4", "clip_score", "latency_ms"} <= set(row)
    assert metrics["features"]["name"] == "inception"
    assert {"report.md", "samples.png", "quality.png"} <= {p.name for p in out.iterdir()}
