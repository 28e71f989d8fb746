"""Several generated volumes of one segmentation side by side (the README's seed figure).

    python benchmarks/seeds_figure.py examples/colin27_tissues_2mm.nii.gz \
        runs/planes-new/volumes/rho0.99-s0.0-seed{0,1,2,3}.nii.gz \
        --names "seed 0" "seed 1" "seed 2" "seed 3" --out docs/images/colin27_seeds.png

One row per volume (middle axial, coronal and sagittal views, one grey window for all rows, so a grey
background or a dim seed shows as such), under the segmentation in volgen's class colours with a legend.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from volgen.io import read_image, read_label  # noqa: E402
from volgen.labels import load_label_map  # noqa: E402
from volgen.preview import rows_figure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("segmentation", type=Path)
    parser.add_argument("volumes", type=Path, nargs="+")
    parser.add_argument("--names", nargs="+", help="row names (default: the file names)")
    parser.add_argument("--labels", default="colin27", help="label map naming the classes")
    parser.add_argument("--title", default="")
    parser.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=(0.0, 1.0),
        metavar=("LOW", "HIGH"),
        help="grey window as fractions of the volumes' 0.5-99.5 percentile range (0 0.1: a dark window)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    names = args.names or [p.name for p in args.volumes]
    if len(names) != len(args.volumes):
        raise SystemExit("--names: one name per volume")
    label_map = load_label_map(args.labels)
    segmentation = read_label(args.segmentation)
    class_image = label_map.remap_image(segmentation)
    rows = [("segmentation", class_image)] + [
        (name, read_image(path)) for name, path in zip(names, args.volumes, strict=True)
    ]
    fig = rows_figure(rows, title=args.title, class_names=label_map.class_names, window=tuple(args.window))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    plt.close(fig)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
