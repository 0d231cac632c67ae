"""A captioner evaluated on captioned pictures: the loss of their captions and the model's own beam-search
captions, scored against them (BLEU-4, CIDEr-D, exact captions). train.py's evaluations (and so its best/)
and blend.py's curve are this.

    evaluator = Evaluator(model, tokenizer, Collate(tokenizer, max_tokens), batch=16)
    evaluator(rows)   # -> {"val_loss", "bleu4", "cider", "exact", "gallery": the first captions}
"""

from contextlib import nullcontext
from dataclasses import asdict

import torch

from ..decoding import DecodeConfig, generate_from
from ..model import IGNORE, caption_labels, caption_loss
from .data import EvalSet
from .metrics import caption_scores

GALLERY = 8  # captions kept per evaluation for report.html


class Evaluator:
    """Evaluates `model` (its prompt, image size and decoding defaults: config.generation) on rows."""

    def __init__(self, model, tokenizer, collate, batch: int = 16, workers: int = 0, device="cpu",
                 autocast=nullcontext):
        self.model, self.tokenizer, self.collate = model, tokenizer, collate
        self.batch, self.workers, self.device, self.autocast = batch, workers, torch.device(device), autocast

    @torch.no_grad()
    def __call__(self, rows) -> dict:
        model, tokenizer, config = self.model, self.tokenizer, self.model.config
        decode = DecodeConfig(**asdict(config.generation))
        prompt_ids = tokenizer.encode_prompt(config.prompt)
        was_training = model.training
        model.eval()
        loader = torch.utils.data.DataLoader(EvalSet(rows, config.vision.image_size, config.prompt),
                                             batch_size=self.batch, collate_fn=self.collate, num_workers=self.workers,
                                             generator=torch.Generator())  # the global stream is left as it was
        loss_sum, n_tokens, predictions = 0.0, 0, []
        for pixels, ids, mask in loader:
            pixels, ids, mask = pixels.to(self.device), ids.to(self.device), mask.to(self.device)
            with self.autocast():
                image = model.encode_image(pixels)  # once, for the loss and for the captions
                labels = caption_labels(ids, mask, len(prompt_ids) - 1, config.text.bos_token_id)
                loss_sum += caption_loss(model.text_decoder(ids, mask, image), labels, 0.0, "sum").item()
                n_tokens += int((labels[:, 1:] != IGNORE).sum())
                new = generate_from(model, image, prompt_ids, decode)
            predictions += [tokenizer.decode(i) for i in new]
        model.train(was_training)
        references = [row.captions for row in rows]
        scores = caption_scores(predictions, references)
        shown = [{"prediction": p, "references": r} for p, r in zip(predictions[:GALLERY], references, strict=False)]
        return {"val_loss": loss_sum / max(1, n_tokens), **scores, "gallery": shown}


def scores_line(result: dict) -> str:
    return (f"val loss {result['val_loss']:.3f}, BLEU-4 {result['bleu4']:.3f}, CIDEr-D {result['cider']:.3f}, "
            f"exact {result['exact']:.1%}")
