"""`tdm plan`'s printed report of tdm.plan.planner.plan's result."""

from __future__ import annotations

from .planner import GIB, MARGIN, SHARDINGS, STRATEGIES

MIB = 2**20


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def format_plan(result: dict, preset: str) -> str:
    s = result["settings"]
    lines = [f"tdm plan: {preset} -- {result['architecture']} ({result['model_class']}, built on the meta device "
             f"from its shipped config; nothing downloaded)",
             f"batch {s['batch_size']} per GPU, K = {s['num_steps']}, guidance {s['guidance_scale']}, gradient "
             f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, generator forward "
             f"{result['generator_forward']}",
             f"LoRA rank {s['lora_rank']} on {', '.join(s['lora_targets'])}",
             "", "Parameters per role (counted) and AdamW state (two float32 moments per trainable weight):",
             f"  {'roles':9} {'role':11} {'weights':>10} {'trainable':>10} {'optimiser':>11}"]
    for strategy in STRATEGIES:
        st = result["strategies"][strategy]
        c, opt = st["counts"], st["optimiser_bytes_per_role"]
        shared = "(shared)" if strategy == "lora" else _params(c.base_params)
        lines.append(f"  {strategy:9} {'teacher':11} {_params(c.base_params):>10} {'0':>10} {'0':>11}")
        for role in ("student", "fake score"):
            lines.append(f"  {strategy:9} {role:11} {shared:>10} {_params(c.trainable_params):>10} {_bytes(opt):>11}")
    lines += ["", f"Activations per GPU at batch {s['batch_size']} (estimate: the tensors one forward with grad "
              f"saves for its backward,", "counted at one sample on the meta device, times the batch):"]
    for strategy in STRATEGIES:
        st = result["strategies"][strategy]
        c = st["counts"]
        lines.append(f"  {strategy:9} {_bytes(c.activations):>11} without checkpointing, "
                     f"{_bytes(c.activations_checkpointed):>11} with ({st['compute_dtype']})")
    lines += ["", f"Per-GPU memory at {result['gpus']} GPUs x {result['gpu_memory_gib']:g} GiB (estimate: "
              f"tdm.plan.memory's model;", f"FSDP shards weights, gradients and optimiser states over the "
              f"{result['gpus']} GPUs):",
              f"  {'layout':14} {'weights':>10} {'optimiser':>10} {'gathered':>10} {'buckets':>10} "
              f"{'held grads':>10} {'grads+step':>10} {'activations':>11} {'peak':>10}  fits"]
    for sharding in SHARDINGS:
        for strategy in STRATEGIES:
            m = result["layouts"][f"{sharding}/{strategy}"]
            lines.append(f"  {sharding + ' ' + strategy:14} {_bytes(m['weights']):>10} {_bytes(m['optimiser']):>10} "
                         f"{_bytes(m['gathered']):>10} {_bytes(m['ddp_buckets']):>10} "
                         f"{_bytes(m['gradients_held']):>10} {_bytes(m['gradients_and_step']):>10} "
                         f"{_bytes(m['activations']):>11} {_bytes(m['peak']):>10}  {m['fits']}")
    lines += ["", "FLOPs per iteration (counted: tdm's schedule; matmuls, convolutions and attention) and time",
              f"at {result['mfu']:.0%} MFU of {result['peak_tflops']:g} TFLOP/s per GPU (estimate; communication "
              f"not counted):",
              f"  {'roles':9} {'TFLOP/sample':>12} {'TFLOP/GPU':>10} {'s/iteration':>12}"]
    for strategy in STRATEGIES:
        st = result["strategies"][strategy]
        lines.append(f"  {strategy:9} {st['tflop_per_sample']['total']:12.2f} "
                     f"{st['tflop_per_iteration_per_gpu']:10.1f} {st['seconds_per_iteration']:12.2f}")
    def named(fit):
        return ", ".join(n.replace("/", " ") for n, m in result["layouts"].items() if m["fits"] == fit) or "none"

    lines += ["", f"Fits in {result['gpus']} x {result['gpu_memory_gib']:g} GiB: {named('yes')}",
              f"Tight (estimated peak within {MARGIN:.0%} of the limit, the estimate's error on measured peaks): "
              f"{named('tight')}"]
    return "\n".join(lines)
