"""Every default and limit of a generation, written once.

The pipeline, :class:`volgen.generation.GenerateSettings`, the ``volgen generate`` and ``volgen batch``
options and the 3D Slicer module's parameters all take their defaults from here;
``tests/test_defaults.py`` fails if one of them drifts.
"""

from __future__ import annotations

from pathlib import Path

#: Inference samplers by name (see :func:`volgen.schedulers.make_scheduler`).
SCHEDULERS: tuple[str, ...] = (
    "ddpm",
    "ddim",
    "dpmsolver++",
    "dpmsolver++3m",
    "sde-dpmsolver++",
    "unipc",
    "deis",
    "euler",
)
SCHEDULER = "dpmsolver++"
#: Denoising steps over the whole schedule. 6, with guidance on the last 30 % of them (``GUIDANCE_INTERVAL``:
#: the last step of 6) and bf16 on CPUs that have it (``PRECISION``): 7 UNet passes per slice instead of 20,
#: 13x the reference way (one-slice DDIM 50, fp32) on the held-out slab, more faithful than DDIM 50 and
#: than the previous defaults (10 steps, every step guided: 0.467 against 0.432 and 0.461 mean Dice, 8 seeds),
#: background error 2.6 % against DDIM 50's 6.0 % (the previous defaults: 2.1 %), in-plane neighbour
#: difference 0.60 of the real slab's against DDIM 50's 0.67; 4 steps were faster still but blurrier in-plane
#: (0.49-0.56) (benchmarks/README.md, "The defaults: steps x guided steps x precision").
STEPS = 6
#: ρ: correlation of the initial noise between neighbouring slices, in [0, 1). 0.995: with guidance, 0.99 left
#: neighbouring slices of held-out anatomy a little more different than real ones (step ratio z 1.22, out of
#: the 0.85-1.2 band); 0.995 gives 1.17 at the same faithfulness (docs/consistency.md).
NOISE_CORRELATION = 0.995
#: ρ of the fine scales: in-plane detail of the initial noise finer than ``NOISE_SCALE`` (cycles per pixel of
#: the model's slices) is correlated between neighbouring slices with this ρ instead; coarse scales keep
#: ``NOISE_CORRELATION``. A value equal to ρ gives volgen's earlier noise exactly (the same bytes per seed).
#: ``auto``: from the slice spacing, by ``FINE_NOISE_BY_SPACING`` (``NATIVE_FINE_NOISE_BY_SPACING`` for
#: native-resolution models).
AUTO_FINE_NOISE = "auto"
FINE_NOISE_CORRELATION: float | str = AUTO_FINE_NOISE
#: ``auto``'s fine ρ against the spacing of the slices (mm), linear in between and constant beyond the ends.
#: Real texture is alike in slices 1 mm apart and not in slices 2 mm apart, and the fine ρ that matches it
#: follows (benchmarks/README.md, "Fine noise by slice spacing", 8 seeds each, generated / real at the real
#: image's own resolution): on the held-out slab at 1 mm, 0.95 gives neighbour step 1.11 and texture 1.02,
#: where 0 flickers (2.83, 0.26) and 0.995 is a little smooth (0.87, 1.06); on the example at 2 mm, 0 gives
#: 0.92 and 0.98, where one ρ copies texture along the slice axis (0.67, 1.37: streaks in every reslice) and
#: 0.7 already 0.77 and 1.24.
FINE_NOISE_BY_SPACING: tuple[tuple[float, float], ...] = ((1.0, 0.95), (2.0, 0.0))
#: The same for native-resolution models (``data.frame: native``): their pixels are the data's own, finer
#: than a fitted frame's (about 3.4 mm for a head in 64 px), and their fine noise is finer anatomy, which
#: stays alike in slices 2 mm apart (benchmarks/README.md, "Fine noise by slice spacing", the native 2 mm
#: model on the example, 8 seeds): 0.6 gives neighbour step 0.94 and texture 0.94 where 0 flickers (1.24,
#: 0.34) and 0.8 is already smooth (0.80, 1.18); at 1 mm 0.95 puts every axis in the band on the held-out
#: slab.
NATIVE_FINE_NOISE_BY_SPACING: tuple[tuple[float, float], ...] = ((1.0, 0.95), (2.0, 0.6))
#: ρ of the fine scales in the background, away from every labelled class (label 0 and the classes
#: dropped from the condition): ``None``, the fine ρ everywhere. Where the background is air with no texture
#: (the Colin27 models), the fine noise that ρ carries from slice to slice becomes grain copied along the
#: slice axis (a neighbour correlation of 0.8 along it against 0.05 in-plane: vertical streaks in every
#: reslice); 0 there makes the grain independent between slices, as it is in-plane. A model asks for it in
#: its ``sampling``.
BACKGROUND_FINE_NOISE_CORRELATION: float | None = None
#: ``--rho-fine-background same``: the fine ρ everywhere, whatever the model asks.
SAME_FINE_NOISE = "same"
#: ``--rho-fine-background auto``: by the ratio of the slice spacing to the model's in-plane pixel (mm/mm),
#: linear between these ends: at or below the first the fine ρ itself, from the second on 0. Grain is
#: independent between the model's pixels in-plane; slices a pixel or more apart want it independent too,
#: where slices half a pixel apart see in-plane grain spread over two voxels and want it alike (measured at
#: the ends: benchmarks/README.md, "Air without streaks").
BACKGROUND_AUTO_RATIOS = (0.5, 1.0)
#: Where the background's own fine ρ takes over: within ``BACKGROUND_MARGIN`` voxels (pixels of the model's
#: slices, and slices) of a labelled voxel the noise is the usual one; ``BACKGROUND_RAMP`` voxels further out
#: it is the background's, blended in between (each voxel keeps unit variance).
BACKGROUND_MARGIN = 2
BACKGROUND_RAMP = 4
#: The boundary between coarse and fine noise scales, in cycles per pixel of the model's slices (a Gaussian
#: transition): 0.08 keeps ρ for structure larger than about 12 pixels.
NOISE_SCALE = 0.08
#: σ in slices of the through-plane smoothing of the x0 prediction (0: off), at most ``MAX_X0_SMOOTHING``.
X0_SMOOTHING = 0.0
MAX_X0_SMOOTHING = 10.0
#: Classifier-free guidance w (Ho & Salimans 2022) towards the condition, away from "nothing specified" (every
#: class flagged unspecified, a condition mask ablation trains): ε = ε_∅ + w·(ε_c − ε_∅), two UNet passes per
#: step. Only models with "specified" flags can be guided. In the settings ``None`` means GUIDANCE_SCALE for
#: such a model and 1 (off, one pass) for older models, whose output stays what it was. 1.5 (was 1.25): on the
#: embedded native model, the example's in-plane high-frequency power 0.77 -> 1.02 of the real image's, every
#: plane's step ratio nearer 1, held-out slab faithfulness 0.525 -> 0.529, the same macaque faithfulness and
#: downstream utility; w 2 loses 0.03 faithfulness (benchmarks/README.md, "Guidance 1.5"). From w 1.75-2
#: structure starts to appear in empty slices (benchmarks/README.md, "Dropout and guidance").
GUIDANCE_SCALE = 1.5
#: The steps guidance runs on, as ``(start, stop)`` positions in the schedule (0: the noisiest step, 1: after
#: the last): a step ``k`` of ``N`` is guided when ``start <= k / N < stop``. The other steps are one unguided
#: UNet pass each. The last 30 %: guidance's gain in faithfulness is made in the late, low-noise steps (the
#: last step of 6 gives 0.467 against 0.456 unguided, all 6 steps' worth), at a sixth of its cost
#: (benchmarks/README.md, "Guidance by step range" and "The defaults"). Fewer than 4 steps guide none.
GUIDANCE_INTERVAL = (0.7, 1.0)
MAX_GUIDANCE_SCALE = 20.0
#: λ: 1 generates freely, 0 returns the reference.
STRENGTH = 1.0
SEED = 0
#: Largest seed: torch's generators take 64-bit seeds; volgen keeps them in signed int64 (JSON, numpy).
MAX_SEED = 2**63 - 1
#: The slice axes by name (``ConditionLayout.axes`` codes 0, 1, 2).
AXIS_NAMES: tuple[str, ...] = ("axial", "coronal", "sagittal")
#: ``--slice-axes``: ``None`` slices along the model's own axis (single-axis sampling in the model's slicing
#: frame); a list of axes (a multi-axis model's) samples in the isotropic cube frame, the slicing axis
#: changing from step to step by the axis schedule (docs/consistency.md).
SLICE_AXES: tuple[str, ...] | None = None
#: How the slicing axis changes over the steps (:func:`volgen.multiaxis.axis_schedule`): ``cycle`` changes
#: it every step; ``late`` keeps the first axis for the early, structure-forming steps and cycles the axes
#: only in the last ``LATE_FRACTION`` of the steps (measured less faithful than ``cycle`` on held-out
#: anatomy: benchmarks/README.md, "Axis schedules, measured").
AXIS_SCHEDULES: tuple[str, ...] = ("cycle", "late")
AXIS_SCHEDULE = "cycle"
LATE_FRACTION = 0.5
#: How a volume generated in the model's frame comes back onto the segmentation's grid (a native frame at
#: the segmentation's own spacing is copied either way): ``mask`` interpolates each voxel only from the
#: frame pixels of its own class (:func:`volgen.frames.mask_guided_resample`: class boundaries where the
#: segmentation puts them at its resolution, background next to anatomy stays background); ``linear``
#: interpolates across classes (volgen before 0.x: boundaries blurred over a frame pixel).
RESAMPLINGS: tuple[str, ...] = ("mask", "linear")
RESAMPLING = "mask"
#: Slices per UNet forward (does not change the result: chunks are padded, see volgen.pipeline.BATCH_GRANULE).
#: ``"auto"`` chooses it from the free memory of the device (volgen.memory.fit_slice_batch_size), at
#: most ``AUTO_SLICE_BATCH_CPU`` on the CPU (which runs every chunk as forwards of 8 slices anyway, so
#: larger chunks gain nothing) and ``AUTO_SLICE_BATCH_GPU`` on CUDA.
SLICE_BATCH_SIZE = "auto"
AUTO_SLICE_BATCH = "auto"
AUTO_SLICE_BATCH_CPU = 16
AUTO_SLICE_BATCH_GPU = 512
#: Volumes ``volgen generate --samples`` writes (sample k: seed + k), and the most one call may ask for.
SAMPLES = 1
MAX_SAMPLES = 10_000
#: What to do with label values the model does not know.
UNKNOWN_LABELS_CHOICES: tuple[str, ...] = ("error", "background")
UNKNOWN_LABELS = "error"
DEVICE = "auto"
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")
#: ``auto``: bf16 autocast on CUDA, and on CPUs with native bf16 (AVX512-BF16, AMX-BF16; channels-last input,
#: 1.6x faster per pass than fp32 at the same faithfulness and background on held-out anatomy,
#: benchmarks/README.md "The defaults"); float32 on other CPUs. ``fp32`` gives the float32 bytes everywhere.
PRECISION = "auto"
#: Without ``--max-memory``: refuse a volume estimated to need more than this share of the free memory.
MEMORY_FRACTION = 0.8

#: The embedded default model: a small demonstration model trained on Colin27 at its example's own 2 mm
#: (native frame). Against ``colin27-small`` (the 64 px fitted frame, still embedded by name), 8 seeds each
#: (benchmarks/README.md, "The embedded model at native resolution"): on the example 0.467 against 0.426
#: mean Dice (the real image 0.485) and in-plane detail where the 64 px frame blurs; on the unseen macaque a
#: segmenter trained on its synthetic pairs reaches 0.87x real against 0.83x, but faithfulness is 0.685
#: against 0.729.
MODEL_DIR = Path(__file__).resolve().parent / "default_model" / "colin27-native"
