"""TDM-unify: the zero-initialised step embedding, the grid per K, and a short unify run on the digits toy."""

import copy
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tdm.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from tdm.config import ConfigError, load_config, to_dict
from tdm.core.algorithm import TDM, TDMConfig, bind_steps
from tdm.core.prediction import PredictionType
from tdm.core.sampling import uniform_grid
from tdm.core.schedules import DiscreteVP
from tdm.registry import build_backbone
from tdm.roles import Roles
from tdm.runs import open_run
from tdm.samplers import student_samplers
from tdm.step_conditioning import StepConditioned, initial_network
from tdm.toys.digits import DigitsUNet
from tdm.toys.gmm import ToyMLP
from tdm.trainer import Trainer
from test_reliability import ENV, _torchrun

VP = DiscreteVP.from_betas("linear", 1000)


def _inputs(net_kind, batch=6):
    g = torch.Generator().manual_seed(0)
    if net_kind == "digits":
        return torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g).float(), \
            torch.arange(batch) % 10
    return torch.randn(batch, 2, generator=g), torch.randint(0, 1000, (batch,), generator=g).float(), \
        torch.arange(batch) % 4


def _network(net_kind):
    torch.manual_seed(0)
    net = DigitsUNet() if net_kind == "digits" else ToyMLP()
    for p in net.parameters():  # digits zero-initialises its output layer; make every output depend on t
        p.data.add_(0.01 * torch.randn_like(p))
    return net, ("time_mlp" if net_kind == "digits" else "time_embedding")


@pytest.mark.parametrize("net_kind", ["digits", "gmm"])
def test_conditioned_network_starts_as_the_network_it_wraps(net_kind):
    net, hook = _network(net_kind)
    x, t, c = _inputs(net_kind)
    wrapped = StepConditioned(net, hook)
    ks = torch.tensor([1, 2, 4, 8, 3, 1])
    with torch.no_grad():
        plain = net(x, t, c)
        for K in (1, 2, 4, 64):
            out = wrapped(x, t, c, num_steps=torch.full((6,), K), step_index=ks.clamp(max=K))
            assert torch.equal(out, plain)
        assert torch.equal(wrapped(x, t, c), plain)


@pytest.mark.parametrize("net_kind", ["digits", "gmm"])
def test_step_embeddings_change_the_output_only_while_they_are_passed(net_kind):
    net, hook = _network(net_kind)
    x, t, c = _inputs(net_kind)
    wrapped = StepConditioned(net, hook)
    torch.nn.init.normal_(wrapped.num_steps_embedding.weight)
    torch.nn.init.normal_(wrapped.step_index_embedding.weight)
    with torch.no_grad():
        plain = net(x, t, c)
        one, four = (wrapped(x, t, c, num_steps=torch.full((6,), K)) for K in (1, 4))
        by_index = wrapped(x, t, c, step_index=torch.full((6,), 2))
        assert not torch.allclose(one, four) and not torch.allclose(one, plain) and not torch.allclose(by_index, plain)
        assert torch.equal(net(x, t, c), plain)  # nothing lingers after a conditioned call
        assert torch.equal(bind_steps(wrapped, TDMConfig(num_steps_set=(1, 4)), 4)(x, t, c), four)
        assert bind_steps(wrapped, TDMConfig(), 4) is wrapped  # a fixed-K config passes nothing
    with pytest.raises(ValueError, match="step conditioning takes values"):
        wrapped(x, t, c, num_steps=torch.full((6,), 65))


def test_a_deep_copy_conditions_through_its_own_embedding():
    net, hook = _network("digits")
    x, t, c = _inputs("digits")
    original = StepConditioned(net, hook)
    clone = copy.deepcopy(original)
    torch.nn.init.normal_(clone.num_steps_embedding.weight)
    K = torch.full((6,), 2)
    with torch.no_grad():
        assert torch.equal(original(x, t, c, num_steps=K), net(x, t, c))
        assert not torch.allclose(clone(x, t, c, num_steps=K), net(x, t, c))


def test_grid_and_draws_follow_the_drawn_number_of_steps():
    tdm = TDM(VP, PredictionType.EPSILON, TDMConfig(num_steps_set=(4, 1, 2), total_steps=1000))
    assert sorted(tdm.grids) == [1, 2, 4] and tdm.grid.num_steps == 4
    for K in (1, 2, 4):
        assert tdm.grids[K] == uniform_grid(1000, K)
        d = tdm.draw((512, 2), torch.Generator().manual_seed(K), num_steps=K)
        assert set(d.k.tolist()) == set(range(1, K + 1))
        assert set(d.t_k.tolist()) == set(uniform_grid(1000, K).timesteps)
        assert bool((d.tau < d.t_k).all()) and bool((d.t_mid <= d.tau).all())
        traj = tdm.student_trajectory(lambda x, t, c, **steps: x, torch.randn(8, 2), None, stop_level=1, num_steps=K)
        assert sorted(traj.x0) == list(range(1, K + 1))
    g = torch.Generator().manual_seed(0)
    drawn = [tdm.draw_num_steps(g) for _ in range(300)]
    assert {K: drawn.count(K) for K in (1, 2, 4)} == pytest.approx({1: 100, 2: 100, 4: 100}, abs=30)


def test_a_fixed_number_of_steps_draws_no_random_numbers():
    tdm = TDM(VP, PredictionType.EPSILON, TDMConfig())
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert tdm.draw_num_steps(g) == 4 and torch.equal(g.get_state(), state)


def test_step_conditioning_config_errors():
    with pytest.raises(ConfigError, match="tdm.num_steps_set"):
        load_config("digits-demo", ["tdm.num_steps_set=[1, 0]"])
    with pytest.raises(ConfigError, match="tdm.num_steps_set"):
        load_config("digits-demo", ["tdm.num_steps_set=[1, 2]", "tdm.timesteps=[999, 500]", "tdm.num_steps=2"])
    with pytest.raises(ConfigError, match="tdm.diffuse_from"):
        load_config("digits-demo", ["tdm.diffuse_from=x0"])

    class NoHook:
        name, time_embedding_module = "nohook", None

        def initial_weights(self):
            return torch.nn.Linear(2, 2)

    with pytest.raises(ConfigError, match="does not name a timestep-embedding module"):
        initial_network(NoHook(), TDMConfig(num_steps_set=(1, 2)), "student")
    config = load_config("digits-demo", ["train.roles=lora", "tdm.fake_step_condition=true"])
    with pytest.raises(ConfigError, match="needs train.roles=separate"):
        Roles.from_config(config, build_backbone(config.backbone))


def test_unify_run_trains_every_k_and_samples_with_the_embedding(tmp_path):
    config = load_config("digits-demo", ["train.iterations=6", "train.batch_size=8", "train.log_every=1",
                                         "tdm.num_steps_set=[1, 2, 4]", "tdm.fake_step_condition=true"])
    trainer = Trainer(config, tmp_path)
    assert isinstance(trainer.student, StepConditioned) and isinstance(trainer.fake_score, StepConditioned)
    seen = []
    step = trainer.train_step

    def recording_step():
        logs = step()
        seen.append(int(logs["train/num_steps"]))
        return logs

    trainer.train_step = recording_step
    trainer.train()
    assert set(seen) == {1, 2, 4}
    # the embeddings were trained, and sampling passes K: two step counts give two different students
    assert trainer.student.num_steps_embedding.weight[[1, 2, 4]].abs().sum() > 0
    assert trainer.fake_score.step_index_embedding.weight[[1, 2, 4]].abs().sum() > 0
    x, t, c = _inputs("digits")
    with torch.no_grad():
        a, b = (sampler.model(x, t, c) for sampler in
                student_samplers(trainer.student_for_sampling(), config.tdm, trainer.backbone.schedule, [1, 4]))
    assert not torch.allclose(a, b)
    trainer.close()


# (overrides, step embeddings of the student, of the fake score); None: the role is not wrapped at all
ROLE_EMBEDDINGS = [
    ([], None, None),
    (["tdm.num_steps_set=[1, 2, 4]"], {"num_steps"}, {"num_steps"}),
    (["tdm.fake_step_condition=true"], None, {"step_index"}),
    (["tdm.num_steps_set=[1, 2, 4]", "tdm.fake_step_condition=true"], {"num_steps"}, {"num_steps", "step_index"}),
]


def _embeddings(module) -> set[str] | None:
    if not isinstance(module, StepConditioned):
        return None
    return {name.removesuffix("_embedding") for name, _ in module.named_children() if name.endswith("_embedding")}


@pytest.mark.parametrize("overrides,student,fake", ROLE_EMBEDDINGS)
def test_each_role_holds_exactly_the_step_embeddings_it_uses(overrides, student, fake, tmp_path):
    """What DDP needs: after one iteration every trainable weight of both roles has a gradient."""
    config = load_config("digits-demo", ["train.batch_size=8", "train.ema_decay=0", "optim.fake_updates=2",
                                         *overrides])
    trainer = Trainer(config, tmp_path)
    assert (_embeddings(trainer.student), _embeddings(trainer.fake_score)) == (student, fake)
    trainer.train_step()
    for role in (trainer.student, trainer.fake_score):
        unused = [name for name, p in role.named_parameters() if p.grad is None]
        assert not unused, unused
    loaded = open_run(trainer.save()).load_student(trainer.backbone, ema=False)  # what evaluate and export load
    assert type(loaded) is type(trainer.student) and _embeddings(loaded) == student
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trainer.student.state_dict().values()))
    trainer.close()


@pytest.mark.parametrize("setting", ["tdm.num_steps_set=[1, 2, 4]", "tdm.fake_step_condition=true"])
def test_a_student_saved_with_both_embeddings_still_loads(setting, tmp_path):
    """Checkpoints written when every conditioned role held both embeddings: the unused one is all zeros."""
    config = load_config("digits-demo", [setting])
    backbone = build_backbone(config.backbone)
    earlier = StepConditioned(copy.deepcopy(backbone.initial_weights()), backbone.time_embedding_module)
    for p in earlier.model.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    if config.tdm.num_steps_set:  # the embedding it used was trained
        torch.nn.init.normal_(earlier.num_steps_embedding.weight)
    path = save_checkpoint(tmp_path, 5, {"student": earlier}, {}, {}, to_dict(config))
    loaded = open_run(path).load_student(backbone, ema=False)
    x, t, c = _inputs("digits")
    with torch.no_grad():
        assert torch.equal(bind_steps(loaded, config.tdm, 2)(x, t, c), bind_steps(earlier, config.tdm, 2)(x, t, c))
    torch.nn.init.normal_(earlier.step_index_embedding.weight)  # a trained unused embedding is not dropped
    path = save_checkpoint(tmp_path, 6, {"student": earlier}, {}, {}, to_dict(config))
    with pytest.raises(CheckpointError, match="does not match"):
        open_run(path).load_student(backbone, ema=False)


@pytest.mark.parametrize("setting,student,fake", [("tdm.num_steps_set=[1,2,4]", ["num_steps"], ["num_steps"]),
                                                  ("tdm.fake_step_condition=true", [], ["step_index"])])
def test_step_conditioned_runs_train_under_two_process_ddp(setting, student, fake, tmp_path):
    """Before each role held only its own embeddings, DDP stopped at the second iteration ("Expected to have
    finished reduction in the prior iteration...")."""
    run = subprocess.run(_torchrun(tmp_path, "train.iterations=2", setting), env=ENV, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    assert checkpoint.name == "step_0000002"
    for role, embeddings in (("student", student), ("fake_score", fake)):
        weights = load_file(checkpoint / f"{role}.safetensors")
        held = [name for name in ("num_steps", "step_index") if f"{name}_embedding.weight" in weights]
        assert held == embeddings
        for name in embeddings:  # trained away from its zero initialisation
            assert weights[f"{name}_embedding.weight"].abs().sum() > 0


@pytest.mark.parametrize("family", ["sd15", "sdxl", "pixart-alpha", "sd3", "cogvideox"])
def test_step_conditioning_through_the_diffusers_adapters(family, tmp_path):
    """Each diffusers family names its timestep-embedding module; wrapped, the network starts as the teacher
    and the K embedding then changes its output."""
    pytest.importorskip("diffusers")
    from tiny_diffusers import load_backbone, save_tiny

    backbone = load_backbone(family, save_tiny(family, tmp_path / family))
    wrapped = initial_network(backbone, TDMConfig(num_steps_set=(1, 2, 4)), "student")
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *backbone.sample_shape), generator=g)
    t = torch.tensor([700.0, 300.0])
    cond = backbone.sample_conditions(2, g)
    K = torch.tensor([2, 2])
    with torch.no_grad():
        plain = backbone.teacher(x, t, cond)
        assert torch.equal(wrapped(x, t, cond, num_steps=K), plain)
        torch.nn.init.normal_(wrapped.num_steps_embedding.weight)
        assert not torch.allclose(wrapped(x, t, cond, num_steps=K), plain)
        assert torch.equal(backbone.teacher(x, t, cond), plain)  # the teacher itself is never hooked
