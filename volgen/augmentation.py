"""Training augmentation with TorchIO: the image slice and its mask context transformed together.

A 2D slice model memorises the few subjects it sees; augmentation teaches it that the mask, not the position
or the subject's exact shape, decides the anatomy. Each training sample is augmented on its own: its centre
image slice and its ``2K+1`` context masks form one TorchIO ``Subject`` of 2D images (a ``ScalarImage``
``(1, H, W, 1)`` and a ``LabelMap`` ``(2K+1, H, W, 1)`` whose channels are the context slices), so every
spatial transform moves image and all context masks alike (linear interpolation for the image, nearest for
the labels), in-plane: rotation about the slice normal, in-plane scaling and translation, in-plane elastic
displacements.

Why per 2D sample and not per volume: every sample of a batch can get its own draw, the work runs in the data
loader's worker processes (``training.num_workers``), and a 2D draw costs a few milliseconds (mostly TorchIO
and SimpleITK overhead: affine ≈ 5 ms, elastic ≈ 20-35 ms, the rest ≈ 1 ms each at 64 px on a shared CPU).
When the CPU cannot keep up with a GPU, ``samples_per_draw`` lets a few consecutive samples share one draw,
transformed together as channels of one subject at the cost of one. Per-volume augmentation would make every
slice of a step share one deformation.

Determinism: TorchIO draws its parameters from torch's global generator. :meth:`Augmenter.__call__` seeds it
from the sample's own seed (derived from ``(run seed, step, position in the global batch)`` by the training
loop) inside ``torch.random.fork_rng``, so nothing else is disturbed and a resumed run repeats an
uninterrupted one exactly.

Intensity transforms act on the image rescaled to [0, 1] (air at 0): gamma and a smooth multiplicative bias
field fit MR, where intensities are relative; for CT (Hounsfield units are physical) only mild noise applies.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from volgen.config import StrictModel


class AugmentationConfig(StrictModel):
    """The ``augmentation:`` section of a training config (probabilities per sample and transform).

    Sizes are fractions of the slice size (translation, elastic displacement), degrees, or relative factors.
    ``flip_left_right`` mirrors the slice left-right (heads and most bodies are near-symmetric); it applies to
    axial and coronal slices, where left-right is in-plane, and never to sagittal ones. The intensity
    transforms (gamma, bias field) apply to MR only.
    """

    enabled: bool = True
    affine_p: float = Field(0.75, ge=0, le=1)
    degrees: float = Field(10.0, ge=0, le=180)
    scale: float = Field(0.1, ge=0, lt=1)
    translation: float = Field(0.05, ge=0, le=0.5)
    elastic_p: float = Field(0.25, ge=0, le=1)
    elastic_displacement: float = Field(0.03, ge=0, le=0.2)
    elastic_control_points: int = Field(7, ge=5, le=32)
    flip_left_right: bool = True
    gamma_p: float = Field(0.3, ge=0, le=1)
    log_gamma: float = Field(0.3, ge=0, le=2)
    bias_field_p: float = Field(0.3, ge=0, le=1)
    bias_field_coefficients: float = Field(0.3, ge=0, le=1)
    noise_p: float = Field(0.2, ge=0, le=1)
    noise_std: float = Field(0.02, ge=0, le=0.5)
    #: Consecutive samples of a batch that share one draw (1: every sample its own). Larger groups make
    #: augmentation cheaper on the CPU (a TorchIO call costs about the same for 1 or 8 samples).
    samples_per_draw: int = Field(1, ge=1, le=64)


class Augmenter:
    """Applies an :class:`AugmentationConfig` to one training sample, reproducibly from a seed.

    Args:
        config: What to apply.
        slice_size: ``H = W`` of the slices (sizes in the config are fractions of it).
        modality: ``MR`` or ``CT`` (decides the intensity transforms).
        slice_axis: ``axial``, ``coronal`` or ``sagittal`` (decides whether left-right is in-plane).
    """

    def __init__(
        self,
        config: AugmentationConfig,
        *,
        slice_size: int,
        modality: Literal["MR", "CT"],
        slice_axis: str,
    ) -> None:
        self.config = config
        self.transform = self._build(config, slice_size, modality, slice_axis)

    @staticmethod
    def _build(config: AugmentationConfig, size: int, modality: str, slice_axis: str):
        import torchio as tio

        spatial, intensity = [], []
        if config.flip_left_right and slice_axis in ("axial", "coronal"):
            # slices are (H, W) with W along x (left-right) for axial and coronal (volgen.frames)
            spatial.append(tio.RandomFlip(axes=(1,), flip_probability=0.5))
        if config.affine_p > 0:
            s, d, t = config.scale, config.degrees, config.translation * size
            spatial.append(
                tio.RandomAffine(
                    scales=(1 - s, 1 + s, 1 - s, 1 + s, 1, 1),
                    degrees=(0, 0, 0, 0, -d, d),
                    translation=(-t, t, -t, t, 0, 0),
                    isotropic=False,
                    default_pad_value=0.0,
                    p=config.affine_p,
                )
            )
        displacement = config.elastic_displacement * size
        if config.elastic_p > 0 and displacement > 0:
            points = config.elastic_control_points
            spacing = size / (points - 3)  # TorchIO needs max_displacement < half the control-point spacing
            spatial.append(
                tio.RandomElasticDeformation(
                    num_control_points=(points, points, 5),
                    max_displacement=(min(displacement, 0.49 * spacing),) * 2 + (0.0,),
                    locked_borders=2,
                    p=config.elastic_p,
                )
            )
        if modality == "MR" and config.gamma_p > 0:
            intensity.append(tio.RandomGamma(log_gamma=config.log_gamma, p=config.gamma_p))
        if modality == "MR" and config.bias_field_p > 0:
            intensity.append(
                tio.RandomBiasField(
                    coefficients=config.bias_field_coefficients, order=3, p=config.bias_field_p
                )
            )
        if config.noise_p > 0 and config.noise_std > 0:
            intensity.append(tio.RandomNoise(std=(0.0, config.noise_std), p=config.noise_p))
        return tio.Compose(spatial + intensity)

    def __call__(self, image: Tensor, context: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        """Augment one sample, or a group of samples with one draw.

        Args:
            image: ``(G, H, W)`` float32 in model space [-1, 1]: the centre slices of ``G`` samples (``G = 1``
                for one sample).
            context: ``(G * S, H, W)`` class indices of their ``S = 2K+1`` context slices, sample-major.
            seed: The draw's seed; the same seed gives the same result.

        Returns:
            ``(image, context)`` of the same shapes and dtypes, the image clipped to [-1, 1].
        """
        import torchio as tio

        unit = (image.float() + 1.0) / 2.0  # air at 0, so padding with 0 adds air
        subject = tio.Subject(  # 2D images (last dim 1); samples and context slices are channels
            image=tio.ScalarImage(tensor=unit[..., None].contiguous()),
            labels=tio.LabelMap(tensor=context[..., None].to(torch.int16)),
        )
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(int(seed))  # the CPU generator only
            out = self.transform(subject)
        augmented = (out["image"].data[..., 0].float() * 2.0 - 1.0).clamp(-1.0, 1.0)
        labels = out["labels"].data[..., 0].to(context.dtype)
        return augmented.contiguous(), labels.contiguous()


class AugmentingCollate:
    """A ``DataLoader`` ``collate_fn`` that augments the batch: samples sharing a seed share one draw.

    Items are dicts with ``image`` ``(1, H, W)``, ``context`` ``(S, H, W)`` and ``seed`` (an int, or ``None``
    for no augmentation). Consecutive items with the same seed form a group transformed as one TorchIO
    subject (the cost of a TorchIO call hardly depends on its channel count, so groups of ``n`` cost about
    ``1/n`` as much per sample, at the price of ``n`` samples sharing their deformation).
    """

    def __init__(self, augmenter: Augmenter) -> None:
        self.augmenter = augmenter

    def __call__(self, items: list[dict]) -> dict[str, Tensor]:
        images, contexts = [], []
        start = 0
        while start < len(items):
            seed = items[start]["seed"]
            stop = start + 1
            while stop < len(items) and seed is not None and items[stop]["seed"] == seed:
                stop += 1
            group = items[start:stop]
            image = torch.cat([item["image"] for item in group])
            context = torch.cat([item["context"] for item in group])
            if seed is not None:
                image, context = self.augmenter(image, context, seed)
            images.append(image[:, None])
            contexts.append(context.reshape(len(group), -1, *context.shape[1:]))
            start = stop
        batch = {"image": torch.cat(images), "context": torch.cat(contexts)}
        if "axis" in items[0]:  # multi-axis training (volgen.multiaxis.MultiAxisSliceDataset)
            batch["axis"] = torch.stack([item["axis"] for item in items])
        return batch
