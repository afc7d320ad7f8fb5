"""The wan family (WanPipeline) on tiny real pipelines built from config: one expert (Wan 2.1) and two experts
switched at a boundary timestep (Wan 2.2 A14B). The network call and the expert routing equal the stock pipeline's,
cached prompts equal encoded ones, and the preset's LoRA distillation trains, resumes and exports a LoRA that the
stock pipeline with TDMScheduler samples exactly as tdm's rollout does."""

import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

diffusers = pytest.importorskip("diffusers")

from tdm.checkpoint import checkpoint_name  # noqa: E402
from tdm.cli import main  # noqa: E402
from tdm.config import ConfigError, load_config  # noqa: E402
from tdm.core.algorithm import make_grid  # noqa: E402
from tdm.core.sampling import rollout  # noqa: E402
from tdm.export import load_pipeline, read_recipe, sampling_kwargs  # noqa: E402
from tdm.meta_init import denoiser_on_meta, on_meta  # noqa: E402
from tdm.trainer import Trainer  # noqa: E402
from test_prompt_cache import assert_identical, conditions, encoded_together, no_model_loads  # noqa: E402
from tiny_diffusers import PROMPTS, cli_sets, save_tiny  # noqa: E402
from tiny_wan import BOUNDARY_RATIO, WAN_FRAMES, WAN_SIZE, load_wan, save_wan  # noqa: E402

PRESET = "wan2.1-t2v-1.3b-lora"
KINDS = {"one": False, "two": True}  # one expert (Wan 2.1), two experts (Wan 2.2 A14B)


@pytest.fixture(scope="module")
def wan_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {**{kind: save_wan(root / kind, two) for kind, two in KINDS.items()},
            "ti2v": save_wan(root / "ti2v", expand_timesteps=True)}  # Wan 2.2 TI2V-5B: a timestep per token


class Calls:
    """Every call of the pipeline's expert transformers: (which expert, its kwargs, its output)."""

    def __init__(self, pipe):
        self.records, self.handles = [], []
        for name in ("transformer", "transformer_2"):
            module = getattr(pipe, name)
            if module is not None:
                self.handles.append(module.register_forward_hook(self.hook(name), with_kwargs=True))

    def hook(self, name):
        def record(module, args, kwargs, output):
            self.records.append((name, {k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)},
                                 output[0].clone()))
        return record


def flow_time(backbone, timestep: torch.Tensor) -> torch.Tensor:
    """tdm's time t with sigma(t) * T = the network timestep (the inverse of the flow shift)."""
    s, T = backbone.schedule.shift, backbone.schedule.num_train_timesteps
    sigma = timestep / T
    return T * sigma / (s - (s - 1) * sigma)


@pytest.mark.parametrize("kind", [*KINDS, "ti2v"])
def test_network_call_and_routing_equal_the_stock_pipeline(kind, wan_dirs):
    """The stock pipeline (its own UniPC scheduler, CFG 5 with a negative prompt): each transformer call it makes,
    cond and uncond, equals tdm's teacher on the same latents, time and prompt / null conditioning, and goes to
    the same expert (4 steps: pipeline timesteps 1000, 900, 750, 500; boundary 600)."""
    backbone = load_wan(wan_dirs[kind], negative_prompt="blurry, low quality")
    pipe = diffusers.WanPipeline.from_pretrained(wan_dirs[kind])
    pipe.set_progress_bar_config(disable=True)
    calls = Calls(pipe)
    pipe(PROMPTS[:2], negative_prompt="blurry, low quality", num_inference_steps=4, guidance_scale=5.0,
         height=WAN_SIZE, width=WAN_SIZE, num_frames=WAN_FRAMES, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    assert len(calls.records) == 8  # 4 steps x (cond, uncond)
    experts = [name for name, _, _ in calls.records]
    boundary = BOUNDARY_RATIO * 1000
    cond, null = backbone.encode_prompts(PROMPTS[:2]), backbone.null_condition(2)
    for i, (name, kwargs, output) in enumerate(calls.records):
        timestep = kwargs["timestep"].float()  # UniPC's flow timesteps are integers: int(sigma * T)
        if kind == "ti2v":  # [B, tokens], one value per sample for text-to-video
            assert timestep.shape == (2, 3 * 4 * 4) and bool((timestep == timestep[:, :1]).all())
            timestep = timestep[:, 0]
        assert name == ("transformer_2" if KINDS.get(kind) and timestep[0] < boundary else "transformer")
        expected = cond if i % 2 == 0 else null
        assert torch.equal(kwargs["encoder_hidden_states"], expected["prompt_embeds"])
        t = flow_time(backbone, timestep)
        torch.testing.assert_close(backbone.schedule.sigma(t) * 1000, timestep, atol=1e-4, rtol=0)
        with torch.no_grad():
            ours = backbone.teacher(kwargs["hidden_states"], t, expected)
        assert (ours - output).abs().max() <= 1e-5
    assert ("transformer_2" in experts) == KINDS.get(kind, False)
    # a batch with levels on both sides of the boundary: each sample runs its own expert
    x = torch.randn(2, *backbone.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([900.0, 200.0])
    with torch.no_grad():
        mixed = backbone.teacher(x, t, cond)
        alone = torch.cat([backbone.teacher(x[i:i + 1], t[i:i + 1], {"prompt_embeds": cond["prompt_embeds"][i:i + 1]})
                           for i in range(2)])
    assert (mixed - alone).abs().max() <= 1e-6


def test_sample_shape_schedule_and_decoding(wan_dirs):
    backbone = load_wan(wan_dirs["one"])
    assert backbone.sample_shape == (4, 3, 8, 8)  # [C, F, h, w]: 9 frames -> 3, 64 px -> 8
    assert backbone.schedule.shift == 3.0 and backbone.prediction.value == "flow"
    assert backbone.pipeline_kwargs() == {"height": WAN_SIZE, "width": WAN_SIZE, "num_frames": WAN_FRAMES,
                                          "max_sequence_length": 512}
    assert backbone.to_videos(torch.zeros(1, 4, 3, 8, 8)).shape == (1, WAN_FRAMES, 3, WAN_SIZE, WAN_SIZE)


def test_cached_conditioning_equals_in_memory_encoding(wan_dirs, tmp_path, monkeypatch, capsys):
    """`tdm cache-prompts --family wan` fills the cache the backbone reads; with it no text encoder loads and every
    conditioning equals the in-memory one (the null prompt included)."""
    folder, prompts, cache = wan_dirs["two"], wan_dirs["two"].parent / "prompts.txt", tmp_path / "cache"

    def refuse(*args, **kwargs):
        raise AssertionError("cache-prompts loaded an expert transformer")

    with monkeypatch.context() as patch:  # neither expert is loaded to encode prompts
        patch.setattr(diffusers.WanTransformer3DModel, "from_pretrained", refuse)
        assert main(["cache-prompts", "--family", "wan", "--model", str(folder), "--prompts", str(prompts),
                     "--out", str(cache)]) == 0
    assert "4 encoded" in capsys.readouterr().out  # 3 prompts and the null prompt ""
    with no_model_loads(monkeypatch):
        cached = load_wan(folder, prompts=str(prompts), prompt_cache=str(cache))
        produced = conditions(cached)
    assert not cached.conditioner.loaded
    memory = load_wan(folder, prompts=str(prompts))
    assert_identical(produced, encoded_together(memory, [*PROMPTS, ""]))


def test_bad_input_gives_one_line_errors(wan_dirs, tmp_path):
    def error(folder, **overrides):
        with pytest.raises(ConfigError) as caught:
            load_wan(folder, **overrides)
        message = str(caught.value)
        assert "\n" not in message
        return message

    sd3 = save_tiny("sd3", tmp_path / "sd3")
    assert error(sd3) == (f"backbone.teacher: {sd3} is a StableDiffusion3Pipeline, but backbone.name=wan expects a "
                          f"WanPipeline; for it set backbone.name=sd3")
    no_encoder = shutil.copytree(wan_dirs["one"], tmp_path / "no-encoder")
    shutil.rmtree(no_encoder / "text_encoder")
    assert error(no_encoder) == (f"backbone.teacher: {no_encoder} has no text_encoder/: WanPipeline encodes "
                                 f"prompts with its UMT5 text encoder and tokenizer")
    assert error(wan_dirs["one"], height=72) == ("backbone.height: wan needs a multiple of 16 pixels "
                                                 "(VAE factor x patch size), got 72")
    assert error(wan_dirs["one"], frames=10) == ("backbone.frames: wan needs 4 k + 1 frames (the VAE's temporal "
                                                 "factor), got 10")


def test_distill_offline_names_the_hub_id(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    code = main(["distill", "--config", PRESET, "--out", str(tmp_path / "run"), "--no-report",
                 "--set", f"backbone.prompts={prompts}",
                 "--set", "train.mixed_precision=no"])  # accelerate's state is per process: as the tests below
    (err,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # hub warnings aside
    assert code == 2 and err.startswith("tdm: error: backbone.teacher: cannot load the wan pipeline "
                                        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers: ")


def overrides(folder, iterations=2):
    """The preset on a tiny pipeline: float32, batch 2, rank 4 with alpha 8 (LoRA scale 2, which the export must
    carry), an EMA, a checkpoint per iteration, learning rates that move the adapters in two iterations."""
    return [f"backbone.teacher={folder}", f"backbone.prompts={folder.parent / 'prompts.txt'}",
            f"backbone.height={WAN_SIZE}", f"backbone.width={WAN_SIZE}", f"backbone.frames={WAN_FRAMES}",
            "backbone.dtype=float32", "train.mixed_precision=no", "train.batch_size=2",
            f"train.iterations={iterations}", "train.log_every=1", "train.checkpoint_every=1",
            "train.keep_checkpoints=0", "train.ema_decay=0.5", "train.lora_rank=4", "train.lora_alpha=8",
            "optim.generator_lr=1e-3", "optim.fake_lr=1e-3", "optim.warmup_steps=0"]


def checkpoint_tensors(path):
    return {f"{p.name}/{k}": v for p in sorted(path.glob("*.safetensors")) if p.name != "rng.safetensors"
            for k, v in load_file(p).items()}


@pytest.mark.parametrize("kind", KINDS)
def test_lora_distillation_resume_and_export_round_trip(kind, wan_dirs, tmp_path):
    """2 iterations of the preset with LoRA roles (adapters on every expert, gradient checkpointing on); resume
    from iteration 1 ends bit for bit where the run did; `tdm export` writes a LoRA per expert that
    WanPipeline.load_lora_weights loads (transformer_2's with load_into_transformer_2) and the stock pipeline with
    TDMScheduler reproduces tdm's rollout of the student; `--ema --merged` writes every expert merged."""
    folder, out = wan_dirs[kind], tmp_path / "run"
    trainer = Trainer(load_config(PRESET, overrides(folder)), out)
    backbone = trainer.backbone
    assert all(expert.is_gradient_checkpointing for expert in backbone.experts)
    assert len(backbone.experts) == (2 if KINDS[kind] else 1)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.train()
    after = trainer.student.state_dict()
    assert {k.split(".")[0] for k in after} == ({"model", "model_2"} if KINDS[kind] else {"model"})
    assert any(not torch.equal(before[k], after[k]) for k in after)
    layers = {k.split(".lora_")[0].split(".", 3)[-1] for k in after}  # model[_2].blocks.N.<layer>
    assert layers == {f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")} | {
        "ffn.net.0.proj", "ffn.net.2"}

    checkpoint = out / "checkpoints" / checkpoint_name(2)
    resumed = tmp_path / "resumed"
    assert main(["distill", "--config", PRESET, "--out", str(resumed), "--no-report", "--resume",
                 str(out / "checkpoints" / checkpoint_name(1)), *cli_sets(overrides(folder))]) == 0
    a, b = checkpoint_tensors(checkpoint), checkpoint_tensors(resumed / "checkpoints" / checkpoint_name(2))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]

    export = tmp_path / "export"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(export)]) == 0
    recipe = read_recipe(export)
    assert recipe["scheduler"]["_class_name"] == "TDMScheduler"  # WanPipeline passes no sigmas
    assert "cannot pass the timesteps or sigmas" in recipe["stock_scheduler"]
    assert recipe["expert_loras"] == ({"transformer_2": "lora_transformer_2"} if KINDS[kind] else {})
    grid = make_grid(trainer.config.tdm, backbone.schedule)
    noise = torch.randn(2, *backbone.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS[:2])
        expected = rollout(trainer.student, noise, cond, grid, backbone.schedule, backbone.prediction)
        teacher = rollout(trainer.teacher, noise, cond, grid, backbone.schedule, backbone.prediction)
    assert (expected - teacher).abs().max() > 1e-3  # the student moved

    # the model card's own code (EXPORT_DIR filled in), on the same latents
    card = (export / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", card, re.S)
    assert code.count("load_into_transformer_2=True") == KINDS[kind]
    code = code.replace("EXPORT_DIR", str(export)).replace(
        'out = pipe(prompt="a photo of a cat", ',
        "calls = Calls(pipe)\nout = pipe(prompt=PROMPTS[:2], output_type='latent', latents=NOISE.clone(), ")
    scope = {"Calls": Calls, "PROMPTS": PROMPTS, "NOISE": noise}
    exec(code, scope)
    assert (scope["out"][0] - expected).abs().max() <= 1e-5
    assert [name for name, _, _ in scope["calls"].records] == (
        ["transformer", "transformer", "transformer", "transformer_2"] if KINDS[kind] else ["transformer"] * 4)
    if KINDS[kind]:  # without transformer_2's LoRA the last step runs the teacher's low-noise expert
        pipe = scope["pipe"]
        pipe.transformer_2.disable_lora()
        alone = pipe(PROMPTS[:2], output_type="latent", latents=noise.clone(), **sampling_kwargs(recipe))[0]
        assert (alone - expected).abs().max() > 1e-3
    pipe, _ = load_pipeline(export)  # what tdm generate loads
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(PROMPTS[:2], output_type="latent", latents=noise.clone(), **sampling_kwargs(recipe))[0]
    assert (latents - expected).abs().max() <= 1e-5

    merged = tmp_path / "merged"  # the EMA student merged into every expert's weights
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(merged), "--ema", "--merged"]) == 0
    assert read_recipe(merged)["merged_experts"] == (["transformer_2"] if KINDS[kind] else [])
    with torch.no_grad():
        ema = rollout(trainer.ema, noise, cond, grid, backbone.schedule, backbone.prediction)
    assert (ema - expected).abs().max() > 1e-4  # EMA != student
    pipe, _ = load_pipeline(merged, merged=True)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(PROMPTS[:2], output_type="latent", latents=noise.clone(), **sampling_kwargs(recipe))[0]
    assert (latents - ema).abs().max() <= 1e-5
    trainer.close()


def test_gradient_checkpointing_on_both_experts_gives_the_same_lora_gradients(wan_dirs, tmp_path):
    """One iteration with and without backbone.gradient_checkpointing on the two-expert teacher: the same
    gradients and updated weights of both adapters on both experts."""
    results = []
    for checkpointing in (False, True):
        trainer = Trainer(load_config(PRESET, [*overrides(wan_dirs["two"], iterations=1), "train.batch_size=4",
                                               f"backbone.gradient_checkpointing={str(checkpointing).lower()}"]),
                          tmp_path / str(checkpointing))
        assert [e.is_gradient_checkpointing for e in trainer.backbone.experts] == [checkpointing] * 2
        trainer.train_step()
        results.append({f"{role}/{name}/{what}": t.detach().clone()
                        for role, module in (("student", trainer.student), ("fake", trainer.fake_score))
                        for name, p in module.named_parameters()  # no grad: its expert ran on no sample
                        for what, t in (("grad", torch.zeros_like(p) if p.grad is None else p.grad), ("weight", p))})
        trainer.close()
    plain, checkpointed = results
    assert plain.keys() == checkpointed.keys()
    for prefix in ("student/model.", "student/model_2.", "fake/model.", "fake/model_2."):  # both experts ran
        assert any(v.abs().sum() > 0 for k, v in plain.items() if k.startswith(prefix) and k.endswith("/grad"))
    assert not [k for k in plain if not torch.equal(plain[k], checkpointed[k])]


def _average_on_rank(rank, folder):
    from tdm.trainer import average_gradients

    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    both, first_only, unused = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    both.grad = torch.full((3,), float(rank + 1))
    if rank == 0:  # e.g. transformer_2's adapter where only rank 0 drew a sample below the boundary
        first_only.grad = torch.full((3,), 4.0)
    average_gradients([both, first_only, unused], 2)
    torch.save([both.grad, first_only.grad, unused.grad], f"{folder}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_gradients_of_an_expert_that_ran_on_one_rank_only_average_as_in_ddp(tmp_path):
    """LoRA roles average gradients in one all-reduce; with two experts a rank's batch may leave one expert's
    adapter without a gradient: it counts as zero there, and keeps none where no rank used it."""
    torch.multiprocessing.spawn(_average_on_rank, args=(str(tmp_path),), nprocs=2)
    for rank in range(2):
        both, first_only, unused = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(both, torch.full((3,), 1.5)) and torch.equal(first_only, torch.full((3,), 2.0))
        assert unused is None


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_loading_builds_every_expert_on_meta(kind, wan_dirs):
    """fsdp_cpu_ram_efficient_loading on ranks > 0: both experts of Wan 2.2 A14B (one of Wan 2.1) are built from
    their configs on the meta device, with no weights read, and receive rank 0's weights when sharded."""
    with denoiser_on_meta():
        backbone = load_wan(wan_dirs[kind])
    assert len(backbone.experts) == (2 if KINDS[kind] else 1)
    assert all(on_meta(expert) for expert in backbone.experts)
    assert not on_meta(backbone.pipeline.text_encoder)


def test_presets():
    a14b = load_config("wan2.2-t2v-a14b-lora")
    assert a14b.backbone.teacher == "Wan-AI/Wan2.2-T2V-A14B-Diffusers" and a14b.backbone.name == "wan"
    assert (a14b.backbone.height, a14b.backbone.width, a14b.backbone.frames) == (720, 1280, 81)
    wan14b = load_config("wan2.1-t2v-14b-lora")
    assert wan14b.backbone.teacher == "Wan-AI/Wan2.1-T2V-14B-Diffusers" and wan14b.tdm.guidance_scale == 5.0
    assert (wan14b.backbone.height, wan14b.backbone.width, wan14b.backbone.frames) == (720, 1280, 81)
    config = load_config(PRESET)
    assert config.backbone.name == "wan" and config.backbone.teacher == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert (config.backbone.height, config.backbone.width, config.backbone.frames) == (480, 832, 81)
    assert config.tdm.guidance_scale == 6.0 and config.backbone.gradient_checkpointing
    assert config.train.roles == "lora" and config.backbone.negative_prompt.startswith("Bright tones")
