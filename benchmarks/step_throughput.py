"""Local training-step throughput and model FLOPs utilisation (MFU) of each preset, beside MONAI's ViT.

    .venv/bin/python benchmarks/step_throughput.py --device cuda                          # every preset, own size
    .venv/bin/python benchmarks/step_throughput.py --device cuda --presets colipri --batch 4 --compile
    .venv/bin/python benchmarks/step_throughput.py --device cuda --presets t3d supervised_clip --channels-last
    .venv/bin/python benchmarks/step_throughput.py --device cuda --peak-tflops 989        # a GPU not in the table
    .venv/bin/python benchmarks/step_throughput.py --size 64 64 64 --depth 2 --steps 3    # this 2-core CPU, shrunk

Part 1, per preset: one local training step as ``shared_models.training.run_steps`` runs it (AdamW as
``make_optimizer`` builds it, fused on CUDA; bf16 autocast on CUDA; gradient clipping; the preset's own
objective weights and gradient checkpointing; vision-language steps alternating with vision-only MAE
steps when the preset weights MAE beside other objectives, each kind timed on its own and then as the
alternating mix), with a site's compute options as ``client.train.apply_compute_options`` applies them
(TF32 on CUDA; ``--compile``, ``--channels-last``; ``--no-checkpointing`` turns checkpointing off). The batch is
synthetic (random volumes of the preset's input size, one short fixed report; HLIP studies of
``--scans`` scans). FLOPs per step: ``torch.utils.flop_counter.FlopCounterMode`` over one forward and
backward with gradient checkpointing off, i.e. model FLOPs: a checkpointed step's recomputation of
activations is not counted, nor the fused attention kernels' recomputation of Q K^T in the backward
(attention counts 2 products forward, 4 backward, whichever kernel runs; on the CPU, whose SDPA kernel
FlopCounterMode does not know, the same formula is supplied). Matmuls and convolutions only. MFU =
FLOPs per step / median step time / the GPU's dense bf16 peak (``PEAK_BF16_TFLOPS`` by device name, or
``--peak-tflops``). On the CPU there is no bf16 peak: the script prints achieved GFLOP/s instead.

Part 2, per ViT preset: our ``ViT3D`` against MONAI's ``monai.networks.nets.ViT`` of the same size (patch,
width, depth, heads, MLP ratio, conv patch embedding, sin-cos positions, qkv bias; a plain ViT, one scan)
on a vision-only objective (mean of the final tokens squared), same input, same optimizer and autocast.
MONAI's attention is timed as shipped (explicit attention matrix) and with ``use_flash_attention`` (SDPA).
Both eager (no compile, no channels-last).

Timings: warm-up steps are dropped, the median of ``--steps`` is reported; ``torch.cuda.synchronize()``
brackets every step on GPU. Memory: peak CUDA memory allocated on GPU; on the CPU, the process's peak
resident set (``resource.getrusage`` maxrss, reset before each measurement through
``/proc/self/clear_refs`` where the kernel allows it, else the process's peak so far).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import resource
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode, bmm_flop, sdpa_backward_flop_count, sdpa_flop_count

import shared_models as sm
from objective_step_times import batch_for  # noqa: E402 - benchmarks/ is the script folder
from client.site_config import ComputeConfig, SiteConfig
from client.train import apply_compute_options
from shared_models.config import VisionConfig
from shared_models.training import StepSettings, make_optimizer, to_device
from shared_models.vision import ViT3D, VisionOutput

PEAK_BF16_TFLOPS = (  # dense bf16 tensor-core peak by device-name fragment; first match wins
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0),
)
CPU_NOTE = "CPU, no bf16 peak: MFU not applicable"
warnings.filterwarnings("ignore", message="torch.meshgrid")  # MONAI's sin-cos positions
T = TypeVar("T")


# ---- the machine -------------------------------------------------------------------------------

def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """Dense bf16 peak of the GPU in TFLOP/s (``override`` first); None on CPU or for an unknown GPU."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in PEAK_BF16_TFLOPS if fragment.lower() in name.lower()), None)


def describe_machine(device: torch.device, peak: float | None) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bf16 = f"bf16 dense peak {peak:g} TFLOP/s" if peak else "bf16 peak unknown (pass --peak-tflops): MFU n/a"
        return f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, {bf16}"
    return f"CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}; {CPU_NOTE}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    """What run_steps uses: bf16 autocast on CUDA, nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak; False on a CPU whose kernel refuses the reset (the peak is then the process's so far)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (Linux >= 4.0)
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device, was_reset: bool) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB CUDA"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
    return f"{rss:.1f} GiB process RSS" + ("" if was_reset else " (peak so far)")


# ---- counting and timing -----------------------------------------------------------------------

def _sdpa_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # Q K^T and P V


def _sdpa_backward_model_flops(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    """The four backward products of attention; torch's formula adds a fifth, the fused kernels'
    recomputation of Q K^T, which is hardware work, not model FLOPs."""
    b, h, s_q, d = query
    recompute = bmm_flop((b * h, s_q, d), (b * h, d, key[2]))
    return sdpa_backward_flop_count(grad_out, query, key, value) - recompute


# Model FLOPs of attention, so that fused SDPA kernels and MONAI's explicit attention matrix count alike.
# FlopCounterMode knows the CUDA attention kernels but not the CPU one SDPA dispatches to: without the
# CPU entries every attention product on the CPU would count as 0 FLOPs.
ATTENTION_MODEL_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_model_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_backward: _sdpa_backward_model_flops,
    torch.ops.aten._scaled_dot_product_efficient_attention_backward: _sdpa_backward_model_flops,
    torch.ops.aten._scaled_dot_product_cudnn_attention_backward: _sdpa_backward_model_flops,
}


@contextlib.contextmanager
def checkpointing_off(module: torch.nn.Module) -> Iterator[None]:
    """Gradient checkpointing of every vision encoder under ``module`` off for a while (model FLOPs)."""
    encoders = [m for m in module.modules() if isinstance(getattr(m, "cfg", None), VisionConfig)]
    saved = [m.cfg.gradient_checkpointing for m in encoders]
    for m in encoders:
        m.cfg.gradient_checkpointing = False
    try:
        yield
    finally:
        for m, value in zip(encoders, saved):
            m.cfg.gradient_checkpointing = value


def count_flops(module: torch.nn.Module, forward_backward: Callable[[], None]) -> int:
    """FLOPs of one forward and backward (the total only: FlopCounterMode's per-module split misplaces
    backward FLOPs, e.g. the encoder's under the MAE decoder)."""
    with checkpointing_off(module), FlopCounterMode(display=False, custom_mapping=ATTENTION_MODEL_FLOPS) as counter:
        forward_backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def median_step_seconds(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """(median seconds of ``steps`` timed steps after ``warmup`` dropped ones, seconds of the first step)."""
    times = []
    for _ in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:]), times[0]


def out_of_memory_guard(measure: Callable[[], T]) -> T | None:
    """``measure()``, or None when the GPU ran out of memory (its memory is released before returning)."""
    try:
        return measure()
    except torch.OutOfMemoryError:
        pass
    gc.collect()  # the failed step's tensors are free only once the exception is gone
    torch.cuda.empty_cache()
    return None


@dataclass
class Measurement:
    """One timed step: what ran, its FLOPs and its time."""

    label: str
    flops: int
    seconds: float
    volumes: int
    memory: str
    first_seconds: float = float("nan")

    def rate(self, peak: float | None) -> tuple[str, str]:
        """(achieved FLOP/s as text, MFU as text)."""
        achieved = self.flops / self.seconds
        if peak is None:
            return f"{achieved / 1e9:.1f} GFLOP/s", "n/a"
        return f"{achieved / 1e12:.1f} TFLOP/s", f"{100 * achieved / (peak * 1e12):.1f}%"


# ---- part 1: each preset's local training step -------------------------------------------------

def shrink(cfg: sm.ModelConfig, size: tuple[int, int, int] | None, depth: int | None) -> sm.ModelConfig:
    """The preset with the input size and ViT depth overridden; multi-view crops scale with the input."""
    overrides: dict = {}
    if depth is not None:
        overrides["vision"] = {"depth": depth}
    if size is not None:
        unit = cfg.vision.patch_size if cfg.vision.kind == "vit" else (16, 16, 16)
        views = [max(u, int(v * s / p) // u * u)
                 for v, s, p, u in zip(cfg.multiview.view_size, size, cfg.preprocess.size, unit)]
        overrides["preprocess"] = {"size": list(size)}
        overrides["multiview"] = {"view_size": views}
    return cfg.replace(**overrides) if overrides else cfg


def step_kinds(weights: dict[str, float]) -> list[tuple[str, dict[str, float]]]:
    """The kinds of step run_steps alternates between for these weights (label, weights of that step)."""
    weights = {k: w for k, w in weights.items() if w > 0}
    if "mae" in weights and len(weights) > 1:
        vision_language = {k: w for k, w in weights.items() if k != "mae"}
        return [("vision-language", vision_language), ("MAE", {"mae": weights["mae"]})]
    return [("all objectives", weights)]


def preset_batch(cfg: sm.ModelConfig, size: int, scans: int, device: torch.device, vision_only: bool) -> dict:
    """A synthetic batch as Collate would give it; HLIP presets get studies of ``scans`` scans."""
    batch = batch_for(cfg, size, str(device))
    if cfg.vision.study_attention_every > 0:
        batch["study"] = torch.randn(size, scans, 1, *cfg.preprocess.size, device=device)
        batch["study_mask"] = torch.ones(size, scans, dtype=torch.bool, device=device)
        batch["volume"] = batch["study"][:, 0]
    vision_keys = ("volume", "study", "study_mask", "finding_labels", "finding_mask")
    return {k: v for k, v in batch.items() if k in vision_keys} if vision_only else batch


def forward_backward(model: sm.FoundationModel, batch: dict, weights: dict[str, float], device: torch.device) -> None:
    with autocast(device):
        loss = sm.training_losses(model, batch, weights)["total"]
    loss.backward()


def training_step(model: sm.FoundationModel, optimizer: torch.optim.Optimizer, batch: dict,
                  weights: dict[str, float], device: torch.device) -> Callable[[], None]:
    """One optimizer step as run_steps takes it (grad_accum 1, no proximal term, clip at 1.0)."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward_backward(model, batch, weights, device)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def apply_site_options(model: sm.FoundationModel, args: argparse.Namespace, device: torch.device) -> None:
    """The site's GPU options as ``client.train`` applies them: TF32 outside autocast on CUDA,
    channels-last-3d conv weights, ``torch.compile`` of each ViT block (or of the whole ResNet encoder)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    site = SiteConfig(compute=ComputeConfig(compile=args.compile, channels_last=args.channels_last))
    apply_compute_options(model, site, device)


def describe_input(cfg: sm.ModelConfig, args: argparse.Namespace, scans: int) -> str:
    """The exact shape, encoder and options that ran, for the table."""
    v = cfg.vision
    studies = f"batch {args.batch}" + (f" studies x {scans} scans" if scans > 1 else "")
    encoder = (f"ViT width {v.width} depth {v.depth} patch {'x'.join(map(str, v.patch_size))}" if v.kind == "vit"
               else f"ResNet {list(v.resnet_layers)} width {v.width}")
    options = [name for name, on in (("gradient checkpointing", v.gradient_checkpointing), ("compiled", args.compile),
                                     ("channels-last", args.channels_last)) if on]
    return f"{studies} of {'x'.join(map(str, cfg.preprocess.size))}, {encoder}" + "".join(f", {o}" for o in options)


def measure_preset(name: str, args: argparse.Namespace,
                   device: torch.device) -> tuple[sm.ModelConfig, list[Measurement], str]:
    """Each kind of local step of the preset, then their alternation; returns (config, rows, input text)."""
    cfg = shrink(sm.load_preset(name), args.size, args.depth)
    if args.no_checkpointing:
        cfg = cfg.replace(vision={"gradient_checkpointing": False})
    torch.manual_seed(0)
    model = sm.build_model(cfg).to(device).train()
    scans = args.scans if cfg.vision.study_attention_every > 0 else 1
    optimizer = make_optimizer(model, StepSettings(steps=1, lr=1e-4, weights=dict(cfg.objectives)), device)
    kinds = []
    for label, weights in step_kinds(cfg.objectives):
        batch = to_device(preset_batch(cfg, args.batch, scans, device, vision_only=label == "MAE"), device,
                          args.channels_last)
        flops = count_flops(model, functools.partial(forward_backward, model, batch, weights, device))
        kinds.append((label, weights, batch, flops))
    apply_site_options(model, args, device)  # after counting: FlopCounterMode runs eagerly
    results = []
    for label, weights, batch, flops in kinds:
        was_reset = reset_peak_memory(device)
        step = training_step(model, optimizer, batch, weights, device)
        seconds, first = median_step_seconds(step, device, args.warmup, args.steps)
        results.append(Measurement(f"{label} ({'+'.join(weights)})", flops, seconds, args.batch * scans,
                                   peak_memory(device, was_reset), first))
    if len(results) > 1:  # run_steps alternates the kinds one step each
        results.append(Measurement("alternating mix (as run_steps)", sum(r.flops for r in results),
                                   sum(r.seconds for r in results), sum(r.volumes for r in results),
                                   "", sum(r.first_seconds for r in results)))
    return cfg, results, describe_input(cfg, args, scans)


def print_presets(args: argparse.Namespace, device: torch.device, peak: float | None) -> list[sm.ModelConfig]:
    print("\n| preset | input and encoder | step | GFLOP/step | s/step | volumes/s | achieved | MFU | peak memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    configs, first_steps = [], []
    for name in args.presets:
        measured = out_of_memory_guard(lambda: measure_preset(name, args, device))  # noqa: B023 - called at once
        if measured is None:
            print(f"| {name} | batch {args.batch} |  |  | out of memory |  |  |  |  |", flush=True)
            continue
        cfg, results, notes = measured
        configs.append(cfg)
        for r in results:
            achieved, mfu = r.rate(peak)
            print(f"| {name} | {notes} | {r.label} | {r.flops / 1e9:.1f} | {r.seconds:.3f} | "
                  f"{r.volumes / r.seconds:.2f} | {achieved} | {mfu} | {r.memory} |", flush=True)
        first_steps.append(f"{name} {results[-1].first_seconds:.1f} s")
    if args.compile:
        print(f"first step, compilation included: {', '.join(first_steps)}")
    return configs


# ---- part 2: our ViT3D against MONAI's ViT ----------------------------------------------------

def plain_vit_config(cfg: sm.ModelConfig, checkpointing: bool):
    """The preset's ViT as a plain ViT (every block attends over the whole scan) on one input channel, as
    MONAI's ViT beside it (no ``input_windows``)."""
    return cfg.replace(vision={"study_attention_every": 0, "slice_group": 0, "input_windows": (),
                               "gradient_checkpointing": checkpointing}).vision


def monai_vit(cfg: sm.ModelConfig, flash: bool) -> torch.nn.Module:
    """MONAI's ViT of the same size as the preset's encoder."""
    from monai.networks.nets import ViT

    v = cfg.vision
    net = ViT(in_channels=1, img_size=tuple(cfg.preprocess.size), patch_size=tuple(v.patch_size), hidden_size=v.width,
              mlp_dim=int(v.width * v.mlp_ratio), num_layers=v.depth, num_heads=v.heads, proj_type="conv",
              pos_embed_type="sincos", classification=False, dropout_rate=0.0, spatial_dims=3, qkv_bias=True)
    for block in net.blocks:
        block.attn.use_flash_attention = flash
    return net


def tokens_of(encoder: torch.nn.Module, volumes: torch.Tensor) -> torch.Tensor:
    out = encoder(volumes)
    return out.tokens if isinstance(out, VisionOutput) else out[0]  # MONAI: (tokens, hidden states)


def measure_encoder(label: str, encoder: torch.nn.Module, volumes: torch.Tensor, args: argparse.Namespace,
                    device: torch.device) -> tuple[Measurement, int]:
    encoder = encoder.to(device).train()
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    def forward_backward() -> None:
        with autocast(device):
            loss = tokens_of(encoder, volumes).float().pow(2).mean()  # [B, N, W] -> scalar
        loss.backward()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        optimizer.step()

    flops = count_flops(encoder, forward_backward)
    was_reset = reset_peak_memory(device)
    seconds, _ = median_step_seconds(step, device, args.warmup, args.steps)
    measured = Measurement(label, flops, seconds, volumes.shape[0], peak_memory(device, was_reset))
    return measured, sum(p.numel() for p in params)


def print_monai_comparison(configs: list[sm.ModelConfig], args: argparse.Namespace, device: torch.device,
                           peak: float | None) -> None:
    vits = [cfg for cfg in configs if cfg.vision.kind == "vit"]
    if not vits:
        return
    print("\nVision-only step (loss = mean of the final tokens squared): our ViT3D and MONAI's ViT of the same size")
    print("\n| preset | input | encoder | parameters (M) | GFLOP/step | s/step | volumes/s | achieved | MFU "
          "| peak memory |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cfg in vits:
        torch.manual_seed(0)
        volumes = torch.randn(args.batch, 1, *cfg.preprocess.size, device=device)
        encoders: list[tuple[str, Callable[[], torch.nn.Module]]] = [
            ("ViT3D (ours)", lambda: ViT3D(plain_vit_config(cfg, False))),
        ]
        if cfg.vision.gradient_checkpointing:
            encoders.append(("ViT3D (ours), gradient checkpointing", lambda: ViT3D(plain_vit_config(cfg, True))))
        encoders += [("MONAI ViT (as shipped: explicit attention matrix)", lambda: monai_vit(cfg, flash=False)),
                     ("MONAI ViT, use_flash_attention=True", lambda: monai_vit(cfg, flash=True))]
        shape = (f"batch {args.batch} of {'x'.join(map(str, cfg.preprocess.size))}, patch "
                 f"{'x'.join(map(str, cfg.vision.patch_size))}, width {cfg.vision.width}, depth {cfg.vision.depth}, "
                 f"{cfg.vision.heads} heads")
        for label, build in encoders:
            measured = out_of_memory_guard(lambda: measure_encoder(label, build(), volumes, args, device))  # noqa: B023
            if measured is None:
                print(f"| {cfg.name} | {shape} | {label} |  |  | out of memory |  |  |  |  |", flush=True)
                continue
            r, count = measured
            achieved, mfu = r.rate(peak)
            print(f"| {cfg.name} | {shape} | {label} | {count / 1e6:.1f} | {r.flops / 1e9:.1f} | {r.seconds:.3f} | "
                  f"{r.volumes / r.seconds:.2f} | {achieved} | {mfu} | {r.memory} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["colipri", "t3d", "hlip", "supervised_clip", "tiny"],
                        choices=sm.available_presets())
    parser.add_argument("--batch", type=int, default=2, help="studies per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="steps run first and dropped")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, nargs=3, metavar=("D", "H", "W"), help="input size instead of the preset's")
    parser.add_argument("--depth", type=int, help="ViT depth instead of the preset's")
    parser.add_argument("--scans", type=int, default=3, help="scans per study for HLIP (brain MR: 3 sequences)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, instead of the table's")
    parser.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off in every preset")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each ViT block, or the ResNet encoder (compute.compile of a site)")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels_last_3d conv weights and volumes (compute.channels_last of a site)")
    parser.add_argument("--skip-monai", action="store_true", help="skip the comparison with MONAI's ViT")
    args = parser.parse_args()
    if args.size and any(s < 1 for s in args.size):
        parser.error(f"--size should be three positive ints, got {args.size}.")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device.")
    peak = peak_tflops(device, args.peak_tflops)
    print(describe_machine(device, peak))
    print(f"median of {args.steps} steps after {args.warmup} warm-up steps"
          + (f"; overrides: size {args.size}" if args.size else "") + (f", depth {args.depth}" if args.depth else ""))
    configs = print_presets(args, device, peak)
    if not args.skip_monai:
        print_monai_comparison(configs, args, device, peak)


if __name__ == "__main__":
    main()
