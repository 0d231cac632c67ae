"""A fine-tuning run sized by its data: what train.py does with the settings its flags leave open.

Fine-tuning on few pictures is what most users of a captioner do, and BLIP's own recipe (5 epochs of COCO's
113k pictures in batches of 256 at lr 1e-5, ~2,200 steps) gives a set of a hundred pictures a handful of
steps that change nothing. So from pretrained weights, fewer than SMALL_SET training captions get:

- a budget in optimizer steps that follows the number of captions, `small_set_steps` (many passes
  over a few pictures, fewer over more), with an evaluation every tenth of it that keeps the best in
  best/, and --patience stopping the run after PATIENCE evaluations without a better one;
- a batch of BATCH (or all the pictures, when there are fewer), and a learning rate for the model's
  width and that batch, `small_set_lr`;
- flips as the only augmentation (a random crop can cut away what the caption names) and the ViT
  learning at VISION_LR_SCALE of the decoder's rate;
- with fewer than HANDFUL pictures, none held out: it trains on all of them, evaluates on them, and
  keeps the last weights (a held-out picture or two would choose best/ by chance).

Larger sets, and training from scratch, keep BLIP's epoch recipe (--epochs, --batch-size 32, evaluation
every epoch). Every value is measured: docs/training.md (benchmarks/lr_scaling.py, demo.py --transfer).
"""

import math
from dataclasses import dataclass

from .data import check_images, read_splits

SMALL_SET = 10_000  # fewer training captions: the small-set plan
BATCH = 16  # pictures per step of a small set
PATIENCE = 3  # evaluations without a better CIDEr-D before a small-set run stops
VISION_LR_SCALE = 0.3  # the ViT's rate, relative to the decoder's, for a small set
# lr = LR_WIDTH_128 * (128 / width) * sqrt(batch / 32): measured best on the tiny (128) and small (256) presets
LR_WIDTH_128 = 1e-3
BLIP_LR, BLIP_BATCH, BLIP_WIDTH = 1e-5, 32, 768  # BLIP's COCO recipe (configs/caption_coco.yaml), per batch of 32


def small_set_lr(width: int, batch: int) -> float:
    """The learning rate for a model of this width at this batch (Adam: a rate that scales as 1 / width keeps
    each layer's update the same size, and as the square root of the batch keeps the noise the same)."""
    return LR_WIDTH_128 * (128 / width) * math.sqrt(batch / 32)


def small_set_steps(n_captions: int, batch: int) -> int:
    """Optimizer steps for a small set: 400 passes over a handful of captions, fewer as they grow (about
    3,200 / sqrt(N) passes: 200 at 256, 100 at 1,000), never fewer than 200 steps nor more than 4,000."""
    passes = max(20.0, 3200 / math.sqrt(n_captions)) if n_captions > 64 else 400.0
    return int(min(4000, max(200, round(passes * n_captions / batch))))


@dataclass
class Plan:
    """The settings a run takes from its data; what the flags gave is kept."""

    small: bool  # the small-set plan (else BLIP's epoch recipe)
    batch_size: int
    lr: float
    max_steps: int | None
    eval_every: int
    patience: int
    vision_lr_scale: float
    augment: str
    keep_last: bool  # no pictures held out: best/ is the last evaluation's weights


def validation_rows(args: dict) -> list:
    """The pictures a run evaluated on, from its saved settings (last/training.json "args"): its validation
    split, or with none held out its training pictures."""
    train, val = read_splits(args["data"], args.get("val_fraction"), args.get("seed", 0))
    return check_images(val if val.rows else train).rows
