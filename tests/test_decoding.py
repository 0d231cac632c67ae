"""Decoding: the same ids as HF `generate` on converted models; beam search on a model whose best
caption is known; seeded, top-p/top-k-respecting sampling."""

import pytest
import torch

from blip import BlipCaptioner
from blip.decoding import DecodeConfig, beam_search, generate, greedy_or_sample, nucleus
from conftest import taught_images

# every test here on both linear paths (blip/speed/linear.py), whatever the CPU
pytestmark = pytest.mark.usefixtures("linear_path")

BAD_WORDS = ["a", "with", "on the"]  # words the taught model says often; "on the" is two tokens
CASES = [  # (name, DecodeConfig fields, as HF generate kwargs too)
    ("greedy", dict(max_new_tokens=20)),
    ("greedy-min-max", dict(max_new_tokens=8, min_new_tokens=6)),
    ("greedy-repetition", dict(max_new_tokens=15, repetition_penalty=1.5)),
    ("beam3", dict(num_beams=3, max_new_tokens=20)),
    ("beam3-min-max", dict(num_beams=3, max_new_tokens=12, min_new_tokens=5)),
    ("beam3-repetition", dict(num_beams=3, max_new_tokens=15, repetition_penalty=1.5)),
    ("beam4-short", dict(num_beams=4, max_new_tokens=6)),
    ("greedy-no-repeat-2", dict(max_new_tokens=20, no_repeat_ngram_size=2)),
    ("greedy-no-repeat-1", dict(max_new_tokens=12, no_repeat_ngram_size=1)),
    ("beam3-no-repeat-3", dict(num_beams=3, max_new_tokens=20, no_repeat_ngram_size=3)),
    ("greedy-bad-words", dict(max_new_tokens=20, bad_words_ids=BAD_WORDS)),
    ("beam3-bad-words", dict(num_beams=3, max_new_tokens=20, bad_words_ids=BAD_WORDS)),
]


def hf_new_tokens(hf, tokenizer, images, prompt, **kwargs) -> list[list[int]]:
    """HF generate's new tokens per image, up to and including the first [SEP]."""
    input_ids = None
    if prompt:  # what BlipProcessor gives: [CLS] prompt [SEP]; HF swaps in [DEC] and drops [SEP]
        input_ids = torch.tensor([tokenizer.encode(prompt)] * len(images))
    with torch.no_grad():
        out = hf.generate(pixel_values=images, input_ids=input_ids, **kwargs)
    P = 1 + len(tokenizer.tokens(prompt))
    rows = out[:, P:].tolist()
    sep = tokenizer.sep_id
    return [r[: r.index(sep) + 1] if sep in r else r for r in rows]


@pytest.mark.parametrize("prompt", ["", "a picture of "])
@pytest.mark.parametrize("name,kwargs", CASES, ids=[c[0] for c in CASES])
def test_same_ids_as_hf_generate(hf_taught, tokenizer, prompt, name, kwargs):
    hf, folder = hf_taught
    if "bad_words_ids" in kwargs:  # words -> token sequences, as HF's docs say to make them
        kwargs = {**kwargs, "bad_words_ids": [tokenizer.tokens(w) for w in kwargs["bad_words_ids"]]}
    ours = BlipCaptioner.from_pretrained(folder)
    images = taught_images(8, seed=123)  # images it was not taught: its captions are uncertain
    got = generate(ours, images, tokenizer.encode_prompt(prompt), DecodeConfig(**kwargs))
    assert got == hf_new_tokens(hf, tokenizer, images, prompt, **kwargs)
    if "min_new_tokens" in kwargs:
        assert all(len(ids) >= kwargs["min_new_tokens"] for ids in got)
    assert all(len(ids) <= kwargs["max_new_tokens"] for ids in got)


def test_bans_change_the_captions_and_hold(hf_taught, tokenizer):
    """The ban cases above would prove little if the taught model never repeated a token or said a banned
    word: it does, and with the bans no sequence holds a repeated token or a banned word."""
    _, folder = hf_taught
    ours = BlipCaptioner.from_pretrained(folder)
    images = taught_images(8, seed=123)
    prompt = tokenizer.encode_prompt("a picture of ")
    for beams in (1, 3):
        plain = generate(ours, images, prompt, DecodeConfig(max_new_tokens=20, num_beams=beams))
        once = generate(ours, images, prompt, DecodeConfig(max_new_tokens=20, num_beams=beams, no_repeat_ngram_size=1))
        assert once != plain
        assert all(len(set(prompt + ids)) == len(prompt + ids) for ids in once)  # no token twice
        bad = [tokenizer.tokens(w) for w in BAD_WORDS]
        clean = generate(ours, images, prompt, DecodeConfig(max_new_tokens=20, num_beams=beams, bad_words_ids=bad))
        assert clean != plain and any(t in ids for ids in plain for t in bad[0] + bad[1])
        for ids in clean:
            assert not {bad[0][0], bad[1][0]} & set(ids)
            assert all(ids[i : i + 2] != bad[2] for i in range(len(ids) - 1))


def test_beam_search_is_not_greedy_here(hf_taught, tokenizer):
    """The parity cases above would prove little if beam search always agreed with greedy."""
    _, folder = hf_taught
    ours = BlipCaptioner.from_pretrained(folder)
    images = taught_images(8, seed=123)
    greedy = generate(ours, images, [tokenizer.dec_id], DecodeConfig(max_new_tokens=20))
    beam = generate(ours, images, [tokenizer.dec_id], DecodeConfig(max_new_tokens=20, num_beams=3))
    assert greedy != beam
    assert len({tuple(ids) for ids in beam}) > 1  # captions differ by image


def test_random_model_same_ids_as_hf(hf_tiny, ours_tiny, tokenizer):
    hf, _ = hf_tiny
    ours = BlipCaptioner.from_pretrained(ours_tiny)
    images = taught_images(3, seed=9)
    for kwargs in (dict(max_new_tokens=10), dict(num_beams=3, max_new_tokens=10, min_new_tokens=3)):
        got = generate(ours, images, [tokenizer.dec_id], DecodeConfig(**kwargs))
        assert got == hf_new_tokens(hf, tokenizer, images, "", **kwargs)


# --- a mock model whose best caption is known ----------------------------------------------
DEC, A, B, C, SEP = 0, 1, 2, 3, 4  # a five-token vocabulary
# next-token probabilities given the last token (a Markov chain; rows: DEC, A, B, C)
TABLE = torch.tensor([
    [0.00, 0.50, 0.30, 0.20, 0.00],  # after DEC: A is likeliest ...
    [0.00, 0.32, 0.30, 0.28, 0.10],  # ... but after A nothing is likely
    [0.00, 0.00, 0.05, 0.05, 0.90],  # after B, [SEP] almost surely: "B [SEP]" is the best caption
    [0.00, 0.00, 0.00, 0.40, 0.60],
])


class Chain:
    """step/reorder over a batch of sequences, as `generate` builds them from the model."""

    def __init__(self):
        self.reorders = 0
        self.last = None

    def step(self, tokens):
        self.last = tokens[:, -1]
        return TABLE[self.last].log()  # log-probs are valid logits

    def reorder(self, index):
        self.reorders += 1

    def looked(self):
        """An "attention map" per sequence that names the token it last saw: one-hot over 5 places."""
        return torch.nn.functional.one_hot(self.last, 5).float()


def best_caption(min_new: int, max_new: int) -> list[int]:
    """Exhaustive search: the caption with the highest mean log-prob per new token, [SEP]
    allowed after at least min_new tokens, at most max_new tokens in all."""
    best, best_score = None, -float("inf")

    def visit(seq, logp):
        nonlocal best, best_score
        last = seq[-1] if seq else DEC
        for token in (A, B, C, SEP):
            p = TABLE[last, token].item()
            if p == 0 or (token == SEP and len(seq) < min_new):
                continue
            new, score = seq + [token], logp + torch.tensor(p).log().item()
            if token == SEP or len(new) == max_new:
                if score / len(new) > best_score:
                    best, best_score = new, score / len(new)
            else:
                visit(new, score)

    visit([], 0.0)
    return best


@pytest.mark.parametrize("min_new,max_new,expected", [(0, 6, [B, SEP]), (2, 6, [A, B, SEP]), (0, 1, [A])])
def test_beam_search_finds_the_best_caption(min_new, max_new, expected):
    assert best_caption(min_new, max_new) == expected  # the known answer
    chain = Chain()
    prompt = torch.full((2 * 3, 1), DEC)  # two images, three beams each
    cfg = DecodeConfig(num_beams=3, min_new_tokens=min_new, max_new_tokens=max_new)
    ids, maps = beam_search(chain.step, chain.reorder, prompt, 2, cfg, SEP)
    assert ids == [expected, expected] and maps is None
    assert chain.reorders >= 1
    # attention maps travel with the winning beam: each new token's map is the one of the step that
    # chose it, which had just seen the token before it
    chain = Chain()
    ids, maps = beam_search(chain.step, chain.reorder, prompt, 2, cfg, SEP, chain.looked)
    assert ids == [expected, expected]
    for m in maps:
        assert m.shape == (len(expected), 5) and m.argmax(dim=1).tolist() == [DEC, *expected[:-1]]


def test_greedy_misses_what_beam_search_finds():
    chain = Chain()
    greedy, maps = greedy_or_sample(chain.step, torch.full((1, 1), DEC), DecodeConfig(max_new_tokens=6), SEP, DEC,
                                    looked=chain.looked)
    assert greedy[0][0] == A and greedy[0] != [B, SEP]
    assert maps[0].argmax(dim=1).tolist() == [DEC, *greedy[0][:-1]]


# --- sampling ---------------------------------------------------------------------------------
def test_nucleus_keeps_the_right_tokens():
    probs = torch.tensor([[0.05, 0.40, 0.25, 0.20, 0.10]])
    logits = probs.log()
    allowed = lambda cfg: torch.isfinite(nucleus(logits, cfg))[0].tolist()  # noqa: E731
    assert allowed(DecodeConfig(top_p=0.6)) == [False, True, True, False, False]  # 0.40 + 0.25 reaches 0.6
    assert allowed(DecodeConfig(top_p=0.65)) == [False, True, True, False, False]  # exactly reached
    assert allowed(DecodeConfig(top_p=0.66)) == [False, True, True, True, False]
    assert allowed(DecodeConfig(top_p=0.1)) == [False, True, False, False, False]  # the top token always stays
    assert allowed(DecodeConfig(top_k=3)) == [False, True, True, True, False]
    assert allowed(DecodeConfig(top_k=3, top_p=0.5)) == [False, True, True, False, False]
    assert allowed(DecodeConfig()) == [True] * 5
    # temperature changes the distribution, not the order
    hot = nucleus(logits, DecodeConfig(temperature=2.0)).softmax(-1)
    assert torch.equal(hot.argsort(), probs.argsort()) and hot.max() < probs.max()


def test_sampling_is_seeded_and_stays_in_the_nucleus(hf_taught, tokenizer):
    _, folder = hf_taught
    model = BlipCaptioner.from_pretrained(folder)
    images = taught_images(4, seed=123)
    cfg = DecodeConfig(sample=True, top_p=0.9, max_new_tokens=12, repetition_penalty=1.1)

    def run(seed):
        return generate(model, images, [tokenizer.dec_id], cfg, torch.Generator().manual_seed(seed))

    assert run(0) == run(0)
    assert run(0) != run(1) or run(0) != run(2)
    # every sampled token was inside the top-k set of its step: check it by teacher forcing
    cfg_k = DecodeConfig(sample=True, top_k=2, temperature=1.5, max_new_tokens=12)
    sampled = generate(model, images, [tokenizer.dec_id], cfg_k, torch.Generator().manual_seed(3))
    with torch.no_grad():
        for img, ids in zip(images, sampled, strict=True):
            seq = torch.tensor([[tokenizer.dec_id, *ids]])
            logits = model(img[None], seq)[0, :-1]  # (n, vocab): what each step saw
            top2 = logits.topk(2, dim=-1).indices
            assert all(tok in row for tok, row in zip(ids, top2.tolist(), strict=True))


def test_bad_settings_are_refused():
    for bad in (dict(max_new_tokens=0), dict(min_new_tokens=5, max_new_tokens=4), dict(num_beams=0),
                dict(sample=True, num_beams=3), dict(top_p=0.0), dict(top_k=-1), dict(temperature=0.0),
                dict(repetition_penalty=0.0)):
        with pytest.raises(ValueError):
            DecodeConfig(**bad).validate()
