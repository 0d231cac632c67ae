"""A fine-tuning run sized by its data: what train.py does with the settings its flags leave open.

Fine-tuning on few pictures is what most users of a captioner do, and BLIP's own recipe (5 epochs of COCO's
113k pictures in batches of 256 at lr 1e-5, ~2,200 steps) gives a set of a hundred pictures a handful of
steps that change nothing. So from pretrained weights, fewer than SMALL_SET training captions get:

- a budget in optimizer steps that follows the number of captions, `small_set_steps` (many passes
  over a few pictures, fewer over more), with an evaluation every tenth of it that keeps the best in
  best/, and --patience stopping the run after PATIENCE evaluations without a better one;
- a batch of BATCH (or all the pictures, when there are fewer), and a learning rate for the model's
  width and that batch, `small_set_lr` (at base size, width 768, batch 8: 4.2e-5; with LoRA, 4 times it);
- flips as the only augmentation (a random crop can cut away what the caption names), the ViT
  learning at VISION_LR_SCALE of the decoder's rate, and DROPOUT in the text model where the budget passes
  over each picture many times (`small_set_dropout`);
- with fewer than HANDFUL pictures, none held out: it trains on all of them, evaluates on them, and
  keeps the last weights (a held-out picture or two would choose best/ by chance).

Larger sets, and training from scratch, keep BLIP's epoch recipe (--epochs, --batch-size 32, evaluation
every epoch). Where each value comes from: docs/training.md (benchmarks/lr_scaling.py, transfer.py).
"""

import math

from .data import check_images, read_splits

SMALL_SET = 10_000  # fewer training captions: the small-set plan
BATCH = 8  # pictures per step of a small set: at the same number of pictures seen, batch 8 beat 32
PATIENCE = 3  # evaluations without a better CIDEr-D before a small-set run stops
VISION_LR_SCALE = 0.3  # the ViT's rate, relative to the decoder's, for a small set
# the text model's dropout in a small-set run, chosen on 64 pitch pictures (validation, the shapes model, seeds 0-2):
# exact captions of the full fine-tune / LoRA 64 at dropout 0: 85.0 / 86.0%, 0.1: 91.0 / 89.0%, 0.2: 94.7 / 90.3%,
# 0.3: 94.3 / 91.7%, 0.4: 93.7 / 89.7% (a few pictures learned many times over: a text model without dropout
# learns them by heart). Only where the budget passes over each picture at least DROPOUT_PASSES times: on 256 pitch
# pictures (50 passes) it took the frozen-ViT fine-tune's validation score from 95% to 87% and changed the others
# by at most 3 points (small_set_dropout). None with a handful of pictures (HANDFUL), where the run keeps its last
# weights and is to write its training captions: six tutorial-style photos at 0.3 got 0 of 6 right
# (tests/test_plan.py), at 0 5 or 6
DROPOUT, DROPOUT_PASSES = 0.3, 100
LR_AT_128_32 = 1e-3  # the best rate at width 128 and batch 32 (benchmarks/lr_scaling.py)
# LoRA's rate, relative to the full fine-tune's: on 64 pitch pictures (validation, the shapes model, rank 16 on
# the attention projections) 1x wrote 74% of the captions exactly, 4x 79%, 16x 78%
LORA_LR_SCALE = 4
SAMPLES, MIN_PASSES, MAX_PASSES = 12_800, 20, 400  # a small set's budget in pictures seen: small_set_steps
BLIP_LR, BLIP_BATCH, BLIP_WIDTH = 1e-5, 32, 768  # BLIP's COCO recipe (configs/caption_coco.yaml), per batch of 32


def small_set_lr(width: int, batch: int, lora: bool = False) -> float:
    """The learning rate for a model of this width at this batch: LR_AT_128_32, in proportion to the batch
    (measured on the tiny preset: at the same number of pictures seen, the best rate at batch 8 was a
    quarter of the best at 32) and in inverse proportion to the width (as for Adam under muP; at widths 128
    and 256 both were best at the rates it gives, while too high a rate was the same at both, so the two do
    not rule out a rate free of the width: docs/performance.md#learning-rate). At BLIP-base's width and
    batch 8 this gives 4.2e-5, near the 5e-5 that HF's BLIP fine-tuning tutorial uses at batch 2.
    LoRA's adapters learn at LORA_LR_SCALE times that."""
    return LR_AT_128_32 * (128 / width) * (batch / 32) * (LORA_LR_SCALE if lora else 1)


def small_set_steps(n_captions: int, batch: int) -> int:
    """Optimizer steps for a small set: SAMPLES captions seen in all (the best evaluations of 16 to 256 pitch
    pictures came after 5,000 to 10,000), but no more than MAX_PASSES passes over a handful and no fewer
    than MIN_PASSES over a larger set."""
    samples = min(MAX_PASSES * n_captions, max(SAMPLES, MIN_PASSES * n_captions))
    return max(1, math.ceil(samples / batch))


def small_set_dropout(passes: float, keep_last: bool, dropout: float = DROPOUT) -> float:
    """The text model's dropout for a small set whose budget passes over each picture `passes` times: `dropout`
    (DROPOUT) at DROPOUT_PASSES or more (64 pictures: 200 passes), none at fewer (256 pictures: 50) or with a
    handful of pictures, none held out (keep_last)."""
    return dropout if passes >= DROPOUT_PASSES and not keep_last else 0.0


def validation_rows(args: dict) -> list:
    """The pictures a run evaluated on, from its saved settings (last/training.json "args"): its validation
    split, or with none held out its training pictures."""
    train, val = read_splits(args["data"], args.get("val_fraction"), args.get("seed", 0))
    return check_images(val if val.rows else train).rows
