"""The speed table on a GPU: a 256 x 256 x 128 volume, ``paper`` preset, precisions and attention kernels.

    python benchmarks/gpu.py                           # needs CUDA; exits with a message otherwise
    python benchmarks/gpu.py --slices 128 --steps 20 --no-compile
    python benchmarks/gpu.py --cpu-smoke               # the same code on the CPU at toy size (tiny, 16 px)

Rows (each: one warm-up chunk, then a full timed run of volgen's pipeline, DPM-Solver++ 20 steps, slice batch
``--slice-batch-size``, channels-last on CUDA, peak ``torch.cuda.max_memory_allocated``):

- ``fp32 sdpa``: fp32, PyTorch scaled-dot-product attention (diffusers' default processor);
- ``fp16 sdpa`` / ``bf16 sdpa``: the UNet under ``torch.autocast`` (as ``volgen generate --precision``);
- ``fp16 xformers`` / ``bf16 xformers``: the same with xformers' memory-efficient attention, when xformers
  imports and accepts the UNet (skipped with a note otherwise);
- ``bf16 sdpa compile``: ``unet.compile()`` (torch.compile, default mode; compilation happens in the warm-up
  and is reported separately);
- the reference way for the ratio: one slice at a time, DDIM 50 steps, fp32 (``ref-ddim50``) and the same in
  bf16 autocast, measured on ``--ref-slices`` slices x 50 steps and extrapolated to the volume (the per-slice
  cost is constant).

The paper preset only has attention at its 16 x 16 level (256 tokens), so the attention kernel matters little
there; the precision and compile rows are the interesting ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import (  # noqa: E402
    EXAMPLE_2MM,
    LABELS_1MM,
    ROOT,
    add_rates,
    bench_model,
    frame_labels,
    machine,
    reference_loop,
    sync,
    volgen_pipeline,
)


def use_sdpa(unet) -> None:
    """PyTorch scaled-dot-product attention in every attention layer (diffusers' default processor)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor2_0())


def use_xformers(unet) -> str | None:
    """Switch to xformers attention; return why not when it cannot be used."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        return "xformers is not installed"
    try:
        unet.enable_xformers_memory_efficient_attention()
    except Exception as e:  # noqa: BLE001 - xformers builds often mismatch torch
        return f"xformers unusable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--slice-batch-size", type=int, default=16)
    parser.add_argument("--ref-slices", type=int, default=4, help="slices measured for the reference rows")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--cpu-smoke", action="store_true", help="run the code path on the CPU at toy size")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-gpu.json")
    args = parser.parse_args()

    if args.cpu_smoke:
        device, preset, slices, steps = torch.device("cpu"), "tiny", 8, 2
        print("--cpu-smoke: tiny preset, 16 px, 8 slices, 2 steps on the CPU (checks the code path only)")
    elif not torch.cuda.is_available():
        sys.exit(
            "benchmarks/gpu.py needs a CUDA GPU and none is available (torch.cuda.is_available() is False); "
            "nothing was measured. Run it on a GPU machine, or use --cpu-smoke to check the code path."
        )
    else:
        device, preset, slices, steps = torch.device("cuda"), "paper", args.slices, args.steps
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are true fp32
        torch.backends.cudnn.allow_tf32 = False

    unet, meta, schedule = bench_model(preset)
    unet = unet.to(device)
    if device.type == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
    source = LABELS_1MM if LABELS_1MM.exists() else EXAMPLE_2MM
    labels = frame_labels(meta.slice_size, slices, source)
    half = torch.float16
    variants = [
        ("fp32 sdpa", None, "sdpa", False),
        ("fp16 sdpa", half, "sdpa", False),
        ("bf16 sdpa", torch.bfloat16, "sdpa", False),
        ("fp16 xformers", half, "xformers", False),
        ("bf16 xformers", torch.bfloat16, "xformers", False),
    ]
    if not args.no_compile:
        variants.append(("bf16 sdpa compile", torch.bfloat16, "sdpa", True))

    rows, notes = [], []
    for name, dtype, attention, compiled in variants:
        if attention == "xformers":
            why = use_xformers(unet)
            if why is not None:
                notes.append(f"{name}: skipped ({why})")
                print(notes[-1], flush=True)
                continue
        else:
            use_sdpa(unet)
        model = unet
        compile_seconds = None
        if compiled:
            import copy

            model = copy.deepcopy(unet)
            model.compile()
            started = time.perf_counter()
            volgen_pipeline(
                model,
                meta,
                schedule,
                labels[: args.slice_batch_size],
                steps=1,
                device=device,
                autocast_dtype=dtype,
                slice_batch_size=args.slice_batch_size,
                warmup=False,
            )
            compile_seconds = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        result = volgen_pipeline(
            model,
            meta,
            schedule,
            labels,
            steps=steps,
            device=device,
            autocast_dtype=dtype,
            slice_batch_size=args.slice_batch_size,
        )
        result.update(mode=f"volgen {name}", compile_seconds=compile_seconds)
        if device.type == "cuda":
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(result)
        print(json.dumps(rows[-1]), flush=True)
        del model

    use_sdpa(unet)
    for name, dtype in (("ref-ddim50 fp32", None), ("ref-ddim50 bf16", torch.bfloat16)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = reference_loop(
            unet,
            meta,
            schedule,
            labels,
            scheduler="ddim",
            steps=50,
            measure_slices=args.ref_slices,
            measure_steps=50,
            device=device,
            autocast_dtype=dtype,
        )
        result["mode"] = name
        if device.type == "cuda":
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(result)
        print(json.dumps(rows[-1]), flush=True)
    sync(device)

    add_rates(rows, baseline="volgen fp32 sdpa")
    info = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"machine": info, "smoke": args.cpu_smoke, "rows": rows, "notes": notes}, indent=2)
    )
    size = meta.slice_size
    print(f"\nmachine: {info}\nvolume: {labels.shape[0]} slices x {size}² px, preset {preset}\n")
    print("| mode | steps | s / volume | x volgen fp32 | slices·steps/s | peak GPU GiB | measured |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        how = r["measured"] + (", extrapolated" if r["extrapolated"] else ", full run")
        if r.get("compile_seconds") is not None:
            how += f"; compile warm-up {r['compile_seconds']:.0f} s"
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        print(
            f"| {r['mode']} | {r['steps']} | {r['seconds_per_volume']:.2f} | {r['times_volgen']:.2f} | "
            f"{r['slice_steps_per_second']:.1f} | {peak} | {how} |"
        )
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
