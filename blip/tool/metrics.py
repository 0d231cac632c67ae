"""Caption metrics: BLEU-4 and CIDEr-D from the COCO caption scorer (pycocoevalcap), and exact matches.

pycocoevalcap's `Bleu` and `Cider` are pure Python (its `Cider` is CIDEr-D: clipped counts and a
length penalty, x10, so a caption equal to every reference scores 10). Its PTB tokenizer needs
Java, so captions are tokenised here the way BLIP cleans them: lower case, punctuation dropped,
split on spaces.
"""

import re


def tokenize(caption: str) -> str:
    """Lower case, words and numbers only, single spaces: what the scorers count n-grams of."""
    return " ".join(re.findall(r"[a-z0-9']+", caption.lower()))


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict:
    """{"bleu4", "cider", "exact"} of one predicted caption per image against its references.
    exact: the fraction of predictions equal to one of their references (after tokenising)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise ImportError("caption metrics need pycocoevalcap: pip install pycocoevalcap") from None
    if len(predictions) != len(references) or not predictions:
        raise ValueError("need one prediction per image, and at least one image")
    res = {i: [tokenize(p)] for i, p in enumerate(predictions)}
    gts = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    exact = sum(res[i][0] in gts[i] for i in res) / len(res)
    return {"bleu4": float(bleu[3]), "cider": float(cider), "exact": exact}
