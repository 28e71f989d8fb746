"""Hardware efficiency: the UNet's achieved FLOP/s against the machine's own matmul FLOP/s, in one run.

    OMP_NUM_THREADS=1 python benchmarks/flops.py
    python benchmarks/flops.py --presets small --small-batch 16 --seconds 10

1. Matmul peak: a ``--matmul-size``² fp32 matrix product in a loop (2·n³ FLOPs each) for about
   ``--seconds``, after a warm-up; on CUDA also bf16.
2. For each preset: FLOPs of one UNet forward at the batch volgen's pipeline uses, counted with
   ``torch.utils.flop_counter.FlopCounterMode`` through :func:`volgen.evaluation.unet_forward_flops`
   (convolutions, matmuls, attention; element-wise work uncounted), then forwards timed (one warm-up, then
   until about ``--seconds`` have passed, at least one) -> achieved FLOP/s = FLOPs x forwards / seconds, and
   its fraction of the matmul FLOP/s.

On the CPU every duration is this process's CPU time (``time.process_time``), not wall time: on a machine
shared with other work, wall time counts the time other processes hold the core, CPU time does not. Run it
with one thread (``OMP_NUM_THREADS=1``): the figures are then per core. On CUDA: wall time, synchronised.

Defaults: ``small`` (64 px) at the batch of the pipeline's UNet forwards (8 slices on the CPU, where the
pipeline always runs forwards of ``BATCH_GRANULE`` slices; 16 = ``slice_batch_size`` on CUDA), ``paper``
(256 px) at batch 1 on the CPU (one forward is about 0.5 TFLOP) and 16 on CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import ROOT, bench_model, machine, sync  # noqa: E402

from volgen.evaluation import unet_forward_flops  # noqa: E402
from volgen.pipeline import BATCH_GRANULE  # noqa: E402


def clock(device: torch.device) -> float:
    """CPU: this process's CPU time (robust when other processes share the cores); CUDA: wall time."""
    return time.process_time() if device.type == "cpu" else time.perf_counter()


def matmul_flops(n: int, seconds: float, device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Sustained FLOP/s of an ``n x n`` matrix product (2·n³ FLOPs), measured for about ``seconds``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    sync(device)
    count, started = 0, clock(device)
    while True:
        torch.mm(a, b)
        count += 1
        if count % 4 == 0 or device.type == "cpu":
            sync(device)
            elapsed = clock(device) - started
            if elapsed >= seconds:
                return 2.0 * n**3 * count / elapsed


@torch.no_grad()
def unet_flops(preset: str, batch: int, seconds: float, device: torch.device) -> dict:
    unet, meta, _ = bench_model(preset)
    unet = unet.to(device)
    flops = unet_forward_flops(unet, batch)
    size = meta.slice_size
    x = torch.randn(batch, unet.config.in_channels, size, size, device=device)
    t = torch.tensor(500, device=device)
    unet(x, t)  # warm-up
    sync(device)
    count, started, wall = 0, clock(device), time.perf_counter()
    while True:
        unet(x, t)
        count += 1
        sync(device)
        elapsed = clock(device) - started
        if elapsed >= seconds:
            break
    return {
        "preset": preset,
        "size": size,
        "batch": batch,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "gflop_per_forward": flops / 1e9,
        "gflop_per_slice": flops / batch / 1e9,
        "forwards": count,
        "seconds": elapsed,
        "wall_seconds": time.perf_counter() - wall,
        "achieved_gflops": flops * count / elapsed / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["small", "paper"])
    parser.add_argument("--small-batch", type=int, default=None, help="default: the pipeline's forward batch")
    parser.add_argument("--paper-batch", type=int, default=None, help="default: 1 on the CPU, 16 on CUDA")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=8.0, help="time per measurement (at least one run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-flops.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    peak = matmul_flops(args.matmul_size, args.seconds, device)
    print(f"matmul {args.matmul_size}² fp32: {peak / 1e9:.1f} GFLOP/s", flush=True)
    extra = {}
    if device.type == "cuda":
        extra["matmul_bf16_gflops"] = (
            matmul_flops(args.matmul_size, args.seconds, device, torch.bfloat16) / 1e9
        )
    rows = []
    for preset in args.presets:
        # the pipeline's forwards: BATCH_GRANULE slices on the CPU, chunks of slice_batch_size 16 on CUDA
        pipeline_batch = BATCH_GRANULE if device.type == "cpu" else 16
        if preset == "paper":
            batch = args.paper_batch or (16 if device.type == "cuda" else 1)
        else:
            batch = args.small_batch or pipeline_batch
        row = unet_flops(preset, batch, args.seconds, device)
        row["fraction_of_matmul"] = row["achieved_gflops"] * 1e9 / peak
        rows.append(row)
        print(json.dumps(row), flush=True)

    info = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {"machine": info, "device": str(device), "matmul_fp32_gflops": peak / 1e9, **extra, "rows": rows}
    args.out.write_text(json.dumps(out, indent=2))
    print(f"\nmachine: {info}\n")
    print(f"matmul {args.matmul_size}² fp32 on {device}: {peak / 1e9:.1f} GFLOP/s\n")
    print(
        "| preset | px | batch | GFLOP / forward | GFLOP / slice | forwards timed | achieved GFLOP/s "
        "| of matmul |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['size']} | {r['batch']} | {r['gflop_per_forward']:.1f} | "
            f"{r['gflop_per_slice']:.2f} | {r['forwards']} | {r['achieved_gflops']:.1f} | "
            f"{100 * r['fraction_of_matmul']:.0f} % |"
        )


if __name__ == "__main__":
    main()
