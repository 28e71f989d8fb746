"""volgen's defaults on a GPU: seconds per volume, the reference loop, and the share of the card's bf16 peak.

    python benchmarks/gpu.py                 # needs CUDA: one call, every row (else exits with a message)
    python benchmarks/gpu.py --no-compile    # without the torch.compile rows
    python benchmarks/gpu.py --smoke         # the code path on the CPU at toy size (tiny preset, bf16)

Rows, for a 256 x 256 x 128 and a 512 x 512 x 256 volume (``paper`` preset, randomly initialised, with the
"specified" flags of the embedded model, so the defaults are guided):

- ``defaults bf16``: the pipeline as ``volgen generate`` runs it (:mod:`volgen.defaults`: sampler, steps,
  guidance and the steps it runs on, ρ, ``slice_batch_size=auto``: chunks sized to the card's free memory),
  under bf16 autocast, channels-last; guidance is one batched forward per chunk. One warm-up step on one
  chunk first, then a full timed run.
- ``defaults bf16 compile``: the same with the UNet in ``torch.compile`` (the one-off compile cost, measured
  in the warm-up, is its own column).
- ``reference ddim50 bf16``: the reference implementation's way, one slice per forward, DDIM 50 steps
  unguided, timed on ``--ref-slices`` slices and extrapolated (the per-slice cost is constant).

Share of peak: the plan's slice-forwards x FLOPs of one slice-forward
(:func:`volgen.evaluation.hardware.unet_forward_flops`) / seconds, against the card's dense bf16 peak (from
the table below by name, or ``--peak-tflops``) and against a measured bf16 matmul.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import ROOT, machine, sync  # noqa: E402

from volgen import defaults  # noqa: E402
from volgen.conditioning import ConditionLayout  # noqa: E402
from volgen.denoiser import runs_autocast  # noqa: E402
from volgen.evaluation.hardware import unet_forward_flops  # noqa: E402
from volgen.labels import load_label_map  # noqa: E402
from volgen.models import ModelMetadata, UNetConfig, build_training_scheduler, build_unet  # noqa: E402
from volgen.pipeline import build_pipeline  # noqa: E402

#: Dense bf16 tensor-core peak (TFLOP/s) by a substring of ``torch.cuda.get_device_name``.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100": 756.0, "A100": 312.0}


def bench_model(preset: str, size: int, device: torch.device):
    """A randomly initialised UNet of ``preset`` at ``size`` px with the embedded model's condition layout."""
    meta = ModelMetadata(
        name=f"bench-{preset}-{size}",
        label_map=load_label_map("colin27"),
        slice_size=size,
        context_slices=1,
        condition=ConditionLayout(specified_flags=True, context_padding="replicate"),
    )
    torch.manual_seed(0)
    config = UNetConfig.preset(preset).model_copy(update={"sample_size": size})
    unet = build_unet(config, meta).eval().to(device)
    if device.type == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
    return unet, meta, build_training_scheduler()


def labels_of(size: int, slices: int) -> torch.Tensor:
    """Blocky class indices ``(slices, size, size)``: nested boxes, like a head's tissue layers."""
    z, y, x = torch.meshgrid(torch.arange(slices), torch.arange(size), torch.arange(size), indexing="ij")
    depth = torch.minimum(torch.minimum(y, size - 1 - y), torch.minimum(x, size - 1 - x)) * 8 // size
    return (depth.clamp(max=3) + (z % 2) * (depth == 0)).long().clamp(max=3)


def matmul_peak(device: torch.device, n: int, seconds: float) -> float:
    """Measured FLOP/s of a bf16 ``n x n`` matrix product in a loop (CPU: float32)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
        if count % 8 == 0:
            sync(device)
    sync(device)
    return 2 * n**3 * count / (time.perf_counter() - started)


def run_defaults(unet, meta, schedule, labels, device, dtype) -> dict:
    """The defaults on ``labels``: a warm-up step on one chunk (compilation happens there), a timed run."""
    pipe = build_pipeline(unet, schedule, meta, scheduler_name=defaults.SCHEDULER)
    plan = pipe.plan(labels.shape[0], autocast_dtype=dtype)  # the defaults, resolved as a run resolves them
    started = time.perf_counter()
    pipe(labels[: plan.slice_batch_size], num_inference_steps=1, autocast_dtype=dtype, seed=0)
    sync(device)
    warmup = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    pipe(labels, autocast_dtype=dtype, seed=0)
    sync(device)
    seconds = time.perf_counter() - started
    row = {
        "steps": plan.steps,
        "guidance": plan.guidance_scale,
        "guided_steps": sum(p == 2 for p in plan.passes),
        "slice_batch_size": plan.slice_batch_size,
        "forwards": plan.forwards,
        "seconds_per_volume": seconds,
        "warmup_seconds": warmup,
    }
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


@torch.no_grad()
def reference_loop(unet, meta, schedule, labels, device, dtype, *, steps: int, measure_slices: int) -> dict:
    """The reference way: one slice per forward, DDIM ``steps`` unguided, through the same denoiser; timed on
    ``measure_slices`` slices and extrapolated to the volume (the per-slice cost is constant)."""
    pipe = build_pipeline(unet, schedule, meta, scheduler_name="ddim")
    denoiser = pipe.denoiser(dtype)
    sched = pipe.scheduler
    sched.set_timesteps(steps, device=device)
    z, size = labels.shape[0], labels.shape[-1]
    vector = denoiser.vector(None, 1)
    vector = None if vector is None else vector.to(device)
    use_autocast = runs_autocast(device, dtype)
    started = None
    for index in range(measure_slices + 1):  # the first slice is the warm-up
        if index == 1:
            sync(device)
            started = time.perf_counter()
        x = torch.randn((1, 1, size, size), generator=torch.Generator().manual_seed(index)).to(device)
        cond = denoiser.volume_condition([labels], [0, z], index, index + 1, None, vector)
        for t in sched.timesteps:
            with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
                eps = denoiser.forward(sched.scale_model_input(x, t), t, cond).float()
            x = sched.step(eps, t, x).prev_sample
    sync(device)
    measured = time.perf_counter() - started
    return {
        "steps": steps,
        "forwards": z * steps,
        "measured": f"{measure_slices} slice(s) x {steps} steps, extrapolated",
        "seconds_per_volume": measured * z / measure_slices,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ref-slices", type=int, default=4, help="slices timed for the reference rows")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak (default: by name)")
    parser.add_argument("--smoke", action="store_true", help="the code path on the CPU at toy size")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-gpu.json")
    args = parser.parse_args()

    if args.smoke:
        device, preset, sizes, dtype = torch.device("cpu"), "tiny", [(16, 8), (32, 16)], torch.bfloat16
        compile_rows, ref_steps, matmul_n = False, 2, 512
        print("--smoke: tiny preset on the CPU, 16 px x 8 and 32 px x 16 slices (checks the code path only)")
    elif not torch.cuda.is_available():
        sys.exit(
            "benchmarks/gpu.py needs a CUDA GPU and none is available (torch.cuda.is_available() is False); "
            "nothing was measured. Run it on a GPU machine, or use --smoke to check the code path."
        )
    else:
        device, preset, sizes, dtype = torch.device("cuda"), "paper", [(256, 128), (512, 256)], torch.bfloat16
        compile_rows, ref_steps, matmul_n = not args.no_compile, 50, 8192
    info = machine()
    name = info.get("gpu") or ""
    nominal = args.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    measured_peak = matmul_peak(device, matmul_n, 1.0 if args.smoke else 3.0)
    rows = []
    for size, slices in sizes:
        unet, meta, schedule = bench_model(preset, size, device)
        labels = labels_of(size, slices).to(device)
        flops = unet_forward_flops(unet, 1)
        variants = [("defaults bf16", unet)]
        if compile_rows:
            compiled = copy.deepcopy(unet)
            compiled.compile()
            variants.append(("defaults bf16 compile", compiled))
        for mode, model in variants:
            row = {"mode": mode, "volume": f"{size}x{size}x{slices}"}
            row.update(run_defaults(model, meta, schedule, labels, device, dtype))
            achieved = row["forwards"] * flops / row["seconds_per_volume"]
            row["tflops"] = achieved / 1e12
            row["share_of_matmul_peak"] = achieved / measured_peak
            row["share_of_bf16_peak"] = None if nominal is None else achieved / (nominal * 1e12)
            rows.append(row)
            print(json.dumps(row), flush=True)
        ref = reference_loop(
            unet, meta, schedule, labels, device, dtype, steps=ref_steps, measure_slices=args.ref_slices
        )
        ref["tflops"] = ref["forwards"] * flops / ref["seconds_per_volume"] / 1e12
        ref["share_of_bf16_peak"] = None if nominal is None else ref["tflops"] / nominal
        rows.append({"mode": f"reference ddim{ref_steps} bf16", "volume": f"{size}x{size}x{slices}", **ref})
        print(json.dumps(rows[-1]), flush=True)
        del variants, unet
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"machine": info, "smoke": args.smoke, "bf16_peak_tflops": nominal, "rows": rows}
    summary["matmul_peak_tflops"] = measured_peak / 1e12
    args.out.write_text(json.dumps(summary, indent=2))
    print(
        f"\nmachine: {info}\nbf16 peak: {nominal} TFLOP/s nominal, {measured_peak / 1e12:.1f} measured matmul"
    )
    print(
        "\n| mode | volume | steps (guided) | slice batch | s / volume | one-off s | TFLOP/s "
        "| share of bf16 peak | peak GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = r.get("share_of_bf16_peak")
        print(
            f"| {r['mode']} | {r['volume']} | {r['steps']} ({r.get('guided_steps', 0)}) | "
            f"{r.get('slice_batch_size', 1)} | {r['seconds_per_volume']:.2f} | "
            f"{r.get('warmup_seconds', 0):.1f} | {r.get('tflops', 0):.1f} | "
            f"{'-' if share is None else f'{share:.1%}'} | {r.get('peak_gib', '-')} |"
        )


if __name__ == "__main__":
    main()
