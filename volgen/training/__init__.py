"""Training the slice model: an accelerate loop with mask ablation, EMA, exact resume and multi-process DDP.

Modules: :mod:`~volgen.training.config` (the YAML config), :mod:`~volgen.training.dataset` (the training
set), :mod:`~volgen.training.randomness` (per-step draws), :mod:`~volgen.training.objective` (loss),
:mod:`~volgen.training.schedule` (learning rate), :mod:`~volgen.training.checkpoint`,
:mod:`~volgen.training.preview`, :mod:`~volgen.training.history` (losses.csv),
:mod:`~volgen.training.signals` (stopping on a signal) and :mod:`~volgen.training.loop` (:func:`train`).

The loop follows Konz et al. (MICCAI 2024): a DDPM training schedule (T = 1000, linear betas; by default
rescaled to zero terminal SNR with v-prediction, or ε-prediction as in the paper), the condition built from
each sample's 2.5D mask context after per-sample mask ablation (:mod:`volgen.conditioning`, the same code
sampling uses) plus the "specified" flags of the classes kept, TorchIO augmentation of image and masks
together (:mod:`volgen.augmentation`), AdamW with linear warmup and cosine decay, gradient clipping and an
EMA of the weights, which is what gets exported.

Determinism. Everything random in a step - which slices form the batch, the timesteps, the noise, the
ablation and each sample's augmentation - is drawn from generators seeded by ``(seed, step)``, never from a
running iterator. So:

- a run resumed from a checkpoint repeats an uninterrupted run step for step (same losses, same weights,
  bit for bit on the CPU; GPU kernels may add last-bit differences);
- with N processes, every rank draws the same *global* batch of ``training.batch_size`` samples and takes
  its own contiguous slice of it; DDP averages the gradients, so N processes train (up to floating-point
  summation order) the same model as one process.

Uniform sampling walks through seeded permutations of all slices (every slice once per epoch);
``data.foreground_weight > 0`` draws slices with replacement, weighted towards slices with anatomy.

Running on several processes (one machine or many; accelerate honours torchrun's environment)::

    torchrun --nproc_per_node N -m volgen train CONFIG.yaml
    accelerate launch -m volgen train CONFIG.yaml          # after `accelerate config`
    torchrun --nnodes M --nproc_per_node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT \
        -m volgen train CONFIG.yaml

``training.batch_size`` is the global batch and must be divisible by the number of processes. Only the main
process writes files (checkpoints, previews, the exported model); every process reads the training data, and
``output_dir`` must be on a filesystem all processes share (each writes its RNG state into the checkpoint).
A checkpoint can be resumed with another number of processes; resuming with a larger ``max_steps`` extends a
finished run on the cosine schedule of the new ``max_steps``. ``max_minutes`` counts the training loop of
this call (not data preparation, not earlier calls).

On disk, under ``output_dir``::

    checkpoints/step-000500/   accelerate state (model.safetensors, optimizer, LR scheduler, RNG) plus
                               ema.safetensors and trainer_state.json (step, loss history, config)
    previews/step-000500.png   mask | real | generated (EMA weights, DDIM) for a few slices of one volume
    model/                     the exported model folder (EMA weights), loadable by volgen.models.load_model
    config.yaml                the resolved config (absolute paths), written when training starts
    losses.csv                 step, loss, lr for every step (rewritten at every checkpoint)
"""

from __future__ import annotations

from volgen.training.checkpoint import list_checkpoints
from volgen.training.config import DataConfig, ModelSection, TrainConfig, TrainingSection
from volgen.training.dataset import TrainingData, prepare_training_data
from volgen.training.history import read_losses
from volgen.training.loop import ProgressCallback, TrainResult, train
from volgen.training.objective import diffusion_loss
from volgen.training.preview import preview_slices, write_preview
from volgen.training.randomness import StepBatchSampler, step_noise, step_seed
from volgen.training.schedule import lr_factor
from volgen.training.signals import StopOnSignal

__all__ = [
    "DataConfig",
    "ModelSection",
    "ProgressCallback",
    "StepBatchSampler",
    "StopOnSignal",
    "TrainConfig",
    "TrainResult",
    "TrainingData",
    "TrainingSection",
    "diffusion_loss",
    "list_checkpoints",
    "lr_factor",
    "prepare_training_data",
    "preview_slices",
    "read_losses",
    "step_noise",
    "step_seed",
    "train",
    "write_preview",
]
