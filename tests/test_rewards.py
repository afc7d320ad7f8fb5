"""Rewards: the digits rewards against the toy's metrics, image rewards, the registry and `score`'s checks."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from tdm.core.sampling import guided, rollout, uniform_grid
from tdm.errors import ConfigError, MissingPackage, TDMError
from tdm.rewards import REWARDS, load_reward, score
from tdm.toys.digits import DigitsBackbone, load_digits_split

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def backbone() -> DigitsBackbone:
    return DigitsBackbone()


@pytest.fixture(scope="module", params=[4, 50], ids=["4 steps", "50 steps"])
def teacher_samples(request, backbone):
    """The shipped teacher's samples (guidance 2) at 4 or 50 steps, balanced labels: (samples, labels)."""
    cond = backbone.evaluation_conditions(200)
    noise = torch.randn(200, *backbone.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        samples = rollout(guided(backbone.teacher, backbone.null_condition(200), 2.0), noise, cond,
                          uniform_grid(1000, request.param), backbone.schedule, backbone.prediction)
    return samples, cond


# --------------------------------------------------------------------------------------------- digits

def test_digits_class_is_the_per_sample_class_accuracy(backbone, teacher_samples):
    samples, cond = teacher_samples
    scores = score(load_reward("digits-class"), backbone.to_images(samples), cond)
    assert scores.dtype == torch.float32 and set(scores.tolist()) <= {0.0, 1.0}
    assert scores.mean().item() == pytest.approx(backbone.metrics(samples, cond)["class_accuracy"], abs=1e-7)
    # the same images with the wrong labels: a different score, so the requested class is what is checked
    assert score(load_reward("digits-class"), backbone.to_images(samples), (cond + 1) % 10).mean() < 0.2


def test_digits_confident_is_a_stricter_decision(backbone, teacher_samples):
    samples, cond = teacher_samples
    images = backbone.to_images(samples)
    decided = score(load_reward("digits-class"), images, cond)
    for threshold in (0.5, 0.99, 1 - 1e-9):
        confident = score(load_reward("digits-confident", threshold=threshold), images, cond)
        assert set(confident.tolist()) <= {0.0, 1.0} and (confident <= decided).all()
    # at 1 - 1e-9 (log-odds 20.7, near the median) the teacher's samples are split: headroom for a reward
    assert 0.2 * len(images) < confident.sum() < 0.8 * len(images)


def test_digits_confident_is_the_probability_threshold(backbone):
    """On noise images, whose probabilities float32 resolves, the log-odds test is p > threshold."""
    images = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(10, (300,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        p = backbone.classifier(images * 2 - 1).double().softmax(1).gather(1, labels[:, None])[:, 0]
    for threshold in (0.5, 0.7, 0.9):
        expected = (p > threshold).float()
        assert 0 < expected.sum() < 300  # both outcomes occur
        assert torch.equal(score(load_reward("digits-confident", threshold=threshold), images, labels), expected)
    with pytest.raises(ConfigError, match=r"digits-confident: threshold must lie in \[0.5, 1\), got 0.3"):
        load_reward("digits-confident", threshold=0.3)


def dilate(images):
    """Grey-scale dilation by a 3x3 max-pool: every stroke one pixel thicker on each side."""
    return F.max_pool2d(images, 3, stride=1, padding=1)


def test_thickness_is_mean_ink_and_rises_with_dilation(backbone):
    thickness = load_reward("digits-thickness")
    dot = torch.zeros(1, 1, 8, 8)
    dot[0, 0, 3, 4] = 1.0
    assert score(thickness, dot).item() == pytest.approx(1 / 64)
    assert score(thickness, dilate(dot)).item() == pytest.approx(9 / 64)  # a 3x3 square of ink
    digits = backbone.to_images(load_digits_split()[0][:100])
    assert (score(thickness, dilate(digits)) > score(thickness, digits)).all()
    aimed = score(load_reward("digits-thickness", target=0.5), dilate(dot))
    assert aimed.item() == pytest.approx(-(0.5 - 9 / 64))


# --------------------------------------------------------------------------------------------- images

def test_jpeg_compressibility_prefers_a_flat_image_to_noise():
    jpeg = load_reward("jpeg-compressibility")
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    flat_score, noise_score = score(jpeg, torch.cat([flat, noise])).tolist()
    assert noise_score < flat_score < 0  # minus a size in kB
    assert noise_score < -5  # 12288 random bytes barely compress at quality 95
    assert score(jpeg, torch.rand(2, 1, 8, 8)).shape == (2,)  # grey images are scored too


def test_clip_score_and_pickscore_reuse_the_evaluation_scorers(tiny_clip):
    from tdm.evaluate.clip_score import CLIPScorer

    scorer = CLIPScorer(str(tiny_clip))
    images = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    prompts = ["a cat", "a dog", "a digit 7", "seven"]
    torch.testing.assert_close(score(load_reward("clip-score", model=str(tiny_clip)), images, None, prompts),
                               scorer.clip_score(images, prompts))
    torch.testing.assert_close(score(load_reward("pickscore", model=str(tiny_clip)), images, None, prompts),
                               scorer.pickscore(images, prompts))
    with pytest.raises(TDMError, match="reward clip-score: needs one prompt per image, got none for 4 images"):
        score(load_reward("clip-score", model=str(tiny_clip)), images)


@pytest.mark.parametrize("name, module, pip", [("hpsv2", "hpsv2", "hpsv2"),
                                               ("imagereward", "ImageReward", "image-reward")])
def test_missing_preference_packages_give_the_install_line(name, module, pip):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed")
    with pytest.raises(MissingPackage, match=f"not installed: pip install {pip}$"):
        load_reward(name)


# ------------------------------------------------------------------------------------------ registry

def test_an_import_path_names_a_reward_of_ones_own(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brightness(images, conditions, prompts):\n    return images.mean((1, 2, 3)).tolist()\n"
        "THRESHOLD = 0.5\n")
    monkeypatch.chdir(tmp_path)  # found as a user's file next to the command, as backbone.name's paths are
    images = torch.rand(3, 1, 8, 8, requires_grad=True)
    scores = score(load_reward("my_rewards:brightness"), images)  # a list is accepted
    torch.testing.assert_close(scores, images.detach().mean((1, 2, 3)))
    assert not scores.requires_grad
    with pytest.raises(ConfigError, match=r"^reward: 'my_rewards:THRESHOLD' names a float, not a callable"):
        load_reward("my_rewards:THRESHOLD")
    with pytest.raises(ConfigError, match=r"^reward: module 'my_rewards' has no 'missing'"):
        load_reward("my_rewards:missing")
    with pytest.raises(ConfigError, match=r"^reward: cannot import module 'no_such_rewards_here'"):
        load_reward("no_such_rewards_here:score")
    with pytest.raises(ConfigError, match=r"^reward: 'my_rewards:' is not an import path \(expected module:Name, "
                                          r"e.g. mypkg.rewards:my_reward\)"):
        load_reward("my_rewards:")
    with pytest.raises(ConfigError, match=r"options \['threshold'\] apply to built-in rewards only"):
        load_reward("my_rewards:brightness", threshold=0.5)


def test_unknown_names_and_options_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"^reward: unknown reward 'digits_class'; choose from \['clip-score', "):
        load_reward("digits_class")
    with pytest.raises(ConfigError, match=r"^reward digits-thickness: bad options \['thresh'\] .* it takes "
                                          r"\(target: 'float \| None' = None\)"):
        load_reward("digits-thickness", thresh=0.5)
    assert set(REWARDS) >= {"digits-class", "digits-confident", "digits-thickness", "jpeg-compressibility",
                            "clip-score", "pickscore", "imagereward", "hpsv2"}


@pytest.mark.parametrize("output, message", [
    (lambda x: x.mean(), r"returned shape \(\), expected \(3,\)"),
    (lambda x: x.flatten(1), r"returned shape \(3, 64\), expected \(3,\)"),
    (lambda x: torch.tensor([0.0, float("nan"), 1.0]), "returned 1 non-finite scores"),
    (lambda x: ["a", "b", "c"], "returned list, not numbers"),
])
def test_score_checks_what_a_reward_returns(output, message):
    with pytest.raises(TDMError, match=f"^reward mine: {message}"):
        score(lambda images, conditions, prompts: output(images), torch.rand(3, 1, 8, 8), name="mine")
