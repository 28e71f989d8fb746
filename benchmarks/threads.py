"""Python API against command line: the same 5-step generate of the example, with another busy process.

Each variant runs in a fresh process (so OpenMP starts as a user's process would) while a pure-Python busy
loop keeps one core occupied; the wall time of the whole process is measured and the outputs compared
byte for byte.

    python benchmarks/threads.py                       # after: this tree
    python benchmarks/threads.py --before-tree DIR     # also the API of an older checkout (volgen/ in DIR)

Variants:
- ``cli``: ``volgen generate EXAMPLE -o cli.nii.gz --steps 5``
- ``api``: ``from volgen.api import generate; generate(EXAMPLE, "api.nii.gz", settings=...)``
- ``api, torch imported first``: ``import torch`` before volgen (the one case volgen cannot fix; it warns)
- ``api before``: as ``api`` with ``PYTHONPATH=DIR`` (the tree before the thread policy moved into volgen)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "colin27_tissues_2mm.nii.gz"

API = (
    "from volgen.api import GenerateSettings, generate\n"
    "generate({example!r}, {out!r}, settings=GenerateSettings(num_inference_steps=5), overwrite=True)\n"
)


def _variants(out: Path, before_tree: Path | None) -> dict[str, tuple[list[str], dict[str, str]]]:
    sibling = Path(sys.executable).with_name("volgen")
    volgen = str(sibling) if sibling.exists() else shutil.which("volgen")
    variants = {
        "cli": (
            [volgen, "generate", str(EXAMPLE), "-o", str(out / "cli.nii.gz"), "--steps", "5", "--overwrite"],
            {},
        ),
        "api": ([sys.executable, "-c", API.format(example=str(EXAMPLE), out=str(out / "api.nii.gz"))], {}),
        "api, torch imported first": (
            [
                sys.executable,
                "-c",
                "import torch\n" + API.format(example=str(EXAMPLE), out=str(out / "api_torch_first.nii.gz")),
            ],
            {},
        ),
    }
    if before_tree is not None:
        variants["api before"] = (
            [sys.executable, "-c", API.format(example=str(EXAMPLE), out=str(out / "api_before.nii.gz"))],
            {"PYTHONPATH": str(before_tree)},
        )
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before-tree", type=Path, help="a checkout whose volgen/ is the 'before' code")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-busy", action="store_true", help="measure on the machine as it is")
    args = parser.parse_args()

    busy = None
    if not args.no_busy:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    results: dict[str, list[float]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            variants = _variants(out, args.before_tree)
            for _ in range(args.repeats):
                for name, (command, extra) in variants.items():
                    env = {
                        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")
                    }
                    env.update(extra)
                    start = time.perf_counter()
                    subprocess.run(command, check=True, env=env, cwd=tmp, capture_output=True)
                    seconds = time.perf_counter() - start
                    results.setdefault(name, []).append(seconds)
                    print(f"{name}: {seconds:.1f} s", flush=True)
            digests = {
                p.name: hashlib.sha256(sitk.GetArrayFromImage(sitk.ReadImage(str(p))).tobytes()).hexdigest()[
                    :16
                ]
                for p in sorted(out.glob("*.nii.gz"))
            }
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    print(
        json.dumps({"seconds": results, "voxel_sha256": digests, "busy_process": busy is not None}, indent=1)
    )


if __name__ == "__main__":
    main()
