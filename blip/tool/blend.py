"""Blending a fine-tuned model back towards the one it started from, to keep what that one knew: the
weights (1 - a) * start + a * tuned for a in [0, 1] (WiSE-FT: Wortsman et al., 2022, "Robust fine-tuning
of zero-shot models"). a = 1 is the fine-tuned model, a = 0 the start; in between, a fine-tune on a new
domain often keeps most of what it learned while getting back much of what it forgot, at no cost in
training or in captioning. blend.py evaluates a grid of a on the run's validation set (the new) and its
--eval-data sets (the old) and writes the blend it chooses.

For a LoRA fine-tune the start is its base, and the blend is the adapters scaled: each layer's update
scale * B A becomes a * scale * B A (B times a), and each trained token row r0 + a (r - r0). That is
exactly (1 - a) * start + a * tuned, and the blend is again a small adapter folder.
"""

from pathlib import Path

import torch

from ..checkpoint import CheckpointError, load_tokenizer, read_adapter, save_adapters, save_evaluation, weights_sha256
from ..lora import LoRALinear, TokenRows, adapters
from ..model import BlipCaptioner
from .data import Collate
from .evaluate import Evaluator

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the blends evaluated unless asked for others


class Blender:
    """The start and the tuned model, and one working model that `set(a)` makes into their blend."""

    def __init__(self, start: Path, tuned: Path, device="cpu"):
        self.start, self.tuned = Path(start), Path(tuned)
        self.adapter = read_adapter(self.tuned)
        if self.adapter is not None and self.adapter["base_sha256"] != weights_sha256(self.start):
            raise CheckpointError(f"{self.tuned}'s LoRA adapters belong to {self.adapter['base']}, not to "
                                  f"{self.start}: blend them with the checkpoint they were trained on")
        self.model = BlipCaptioner.from_pretrained(self.tuned, map_location=device)
        self.tokenizer = load_tokenizer(self.tuned)
        if self.adapter is not None:  # the adapters as trained; the start is the base they sit on
            self.ends = {name: (m.lora_B.detach().clone() if isinstance(m, LoRALinear) else
                                (m.weight.detach()[m.ids].clone(), m.rows.detach().clone()))
                         for name, m in adapters(self.model)}
        else:
            start_model = BlipCaptioner.from_pretrained(self.start, map_location=device)
            a, b = start_model.state_dict(), self.model.state_dict()
            if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
                raise CheckpointError(f"{self.start} and {self.tuned} are not the same model: they cannot be blended")
            self.ends = {k: (a[k].clone(), b[k].clone()) for k in a if b[k].is_floating_point()}

    @torch.no_grad()
    def set(self, a: float):
        """Make the working model (1 - a) * start + a * tuned."""
        if self.adapter is not None:
            for name, m in adapters(self.model):
                if isinstance(m, TokenRows):
                    m.rows.copy_(torch.lerp(*self.ends[name], a))
                else:
                    m.lora_B.copy_(self.ends[name] * a)
            return
        state = self.model.state_dict()
        for k, (s, t) in self.ends.items():
            state[k].copy_(torch.lerp(s, t, a))

    def save(self, folder: Path):
        """Write the working model as a checkpoint folder: an adapter folder for a LoRA fine-tune."""
        if self.adapter is not None:
            save_adapters(self.model, folder, self.tokenizer, self.adapter)
        else:
            self.model.save_pretrained(folder, self.tokenizer)


def choose(curve: list[dict], keep: float | None) -> dict:
    """The blend to keep: the best validation CIDEr-D among those whose CIDEr-D on every --eval-data set is at
    least `keep` times the start's (a = 0, which always qualifies); of equals, the larger a."""
    start = next(r for r in curve if r["alpha"] == 0) if keep else None
    fine = [r for r in curve if not keep or all(r["eval_sets"][n]["cider"] >= keep * s["cider"]
                                                for n, s in start["eval_sets"].items())]
    return max(fine, key=lambda r: (r["val"]["cider"], r["alpha"]))


def blend_run(start: Path, tuned: Path, val, extra: dict, alphas: list[float], keep: float | None,
              alpha: float | None, out: Path, batch: int = 16, say=print) -> dict:
    """Evaluate the blends of `start` and `tuned` at `alphas` on `val` rows and each `extra` set's rows, write
    the chosen one (`alpha`, else by `keep`: blend.choose) to `out`; returns its curve entry."""
    blender = Blender(start, tuned)
    everything = [r for rows in (val, *extra.values()) for r in rows]
    longest = max(len(blender.tokenizer.encode_caption(c)) for r in everything for c in r.captions)
    prompt = len(blender.tokenizer.tokens(blender.model.config.prompt))
    evaluate = Evaluator(blender.model, blender.tokenizer, Collate(blender.tokenizer, longest + prompt), batch)
    curve = []
    say(f"{'a':>5}  {'validation':>24}" + "".join(f"  {name[:24]:>24}" for name in extra))
    for a in alphas:
        blender.set(a)
        scores = {name: {k: v for k, v in evaluate(rows).items() if k != "gallery"}
                  for name, rows in {"validation": val, **extra}.items()}
        curve.append({"alpha": a, "val": scores.pop("validation"), "eval_sets": scores})
        say(f"{a:5.2f}" + "".join(f"  {s['cider']:10.3f} CIDEr-D {s['exact']:6.1%}"
                                  for s in (curve[-1]["val"], *scores.values())))
    chosen = next(r for r in curve if r["alpha"] == alpha) if alpha is not None else choose(curve, keep)
    blender.set(chosen["alpha"])
    blender.save(out)
    save_evaluation(out, {**chosen, "start": str(start), "tuned": str(tuned), "curve": curve})
    say(f"a = {chosen['alpha']:g}" + (f" (the best on the validation set keeping {keep:g} of the start's CIDEr-D on "
                                      f"{', '.join(extra)})" if keep and alpha is None else "") + f": wrote {out}")
    return chosen
