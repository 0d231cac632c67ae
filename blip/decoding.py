"""Caption decoding: greedy, beam search and nucleus sampling, on our own KV cache.

The image is encoded once. Each decoder layer's cross-attention keys/values are computed once per
image and shared by all of that image's beams (`text.KVCache`: beams fold into the query axis, so
nothing image-sized is copied or re-ordered); self-attention keys/values are cached per sequence
and re-ordered as beam search picks beams. Greedy and beam search give the ids HF `generate` gives
(BLIP's published numbers used its beam search: 3 beams, length penalty 1.0, no early stopping),
including where HF applies the repetition penalty: to logits in greedy/sampling, to log-probs in
beam search.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

NEG = -1e9  # score of a beam slot that must not be chosen (HF uses the same constant)


@dataclass
class DecodeConfig:
    max_new_tokens: int = 20  # new tokens at most, the closing [SEP] counted (HF's max_new_tokens)
    min_new_tokens: int = 0  # [SEP] is not allowed before this many new tokens (HF's min_new_tokens)
    num_beams: int = 1  # 1: greedy or sampling; more: beam search
    sample: bool = False  # nucleus sampling instead of greedy
    top_p: float = 1.0  # sample only from the fewest tokens whose probabilities add up to top_p
    top_k: int = 0  # ... and only from the k most likely (0: no limit)
    temperature: float = 1.0  # divides the logits before sampling; < 1 is more conservative
    repetition_penalty: float = 1.0  # > 1 makes tokens already in the sequence less likely (CTRL)
    length_penalty: float = 1.0  # a finished beam scores sum(log p) / new_tokens ** length_penalty
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this many tokens twice in a sequence, prompt included
    bad_words_ids: tuple = ()  # token sequences never to generate (HF's bad_words_ids): ((id, ...), ...)

    def validate(self):
        checks = [
            (self.max_new_tokens >= 1, "max new tokens must be at least 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min new tokens must be between 0 and max new tokens"),
            (self.num_beams >= 1, "beams must be at least 1"),
            (not (self.sample and self.num_beams > 1), "sampling uses one beam: drop --beams or --sample"),
            (0 < self.top_p <= 1, "top-p must be in (0, 1]"),
            (self.top_k >= 0, "top-k must be 0 (off) or positive"),
            (self.temperature > 0, "temperature must be positive"),
            (self.repetition_penalty > 0, "repetition penalty must be positive"),
            (self.no_repeat_ngram_size >= 0, "no-repeat n-gram size must be 0 (off) or positive"),
            (all(len(words) for words in self.bad_words_ids), "a banned word has no tokens"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


SAMPLING = {"top_p": 0.9, "repetition_penalty": 1.1}  # BLIP's nucleus sampling (configs/caption_coco.yaml)


def changed(base: DecodeConfig, **options) -> DecodeConfig:
    """`base` (a checkpoint's defaults) with `options` changed. sample=True draws one sequence (one beam,
    whatever beams `base` searches with) with BLIP's SAMPLING settings, unless `options` give others: the
    same defaults from caption.py --sample and from Captioner.caption(sample=True)."""
    if options.get("sample"):
        options = {"num_beams": 1, **SAMPLING, **options}
    return replace(base, **options)


@torch.inference_mode()
def generate(model, pixel_values, prompt_ids: list[int], cfg: DecodeConfig, generator=None,
             attention: list | None = None) -> list[list[int]]:
    """Caption a batch of images. prompt_ids: [DEC] + prompt tokens.
    Returns the new token ids of each image, ending with [SEP] when the caption was finished.
    attention: as in `generate_from`."""
    return generate_from(model, model.encode_image(pixel_values), prompt_ids, cfg, generator, attention)


@torch.inference_mode()
def generate_from(model, image, prompt_ids: list[int], cfg: DecodeConfig, generator=None,
                  attention: list | None = None) -> list[list[int]]:
    """`generate` for images already encoded: image (B, N, C) image tokens.

    attention: when a list is given, it receives per image a (new tokens, N) tensor: for each new
    token, where the decoder's cross-attention looked when it chose that token (the query of the
    position before it), as probabilities over the N image tokens averaged over all layers and
    heads. They come from this same decoding run, following the winning beam."""
    cfg.validate()
    cache = model.new_cache(image, record=attention is not None)  # cross-attention keys/values, once per image
    B, K = image.shape[0], cfg.num_beams
    prompt = torch.tensor(prompt_ids, device=image.device).expand(B * K, -1)  # (B*K, P)

    def step(tokens):  # (B*K, t) new tokens -> (B*K, vocab) logits for the token after them
        return model.text_decoder(tokens, cache=cache)[:, -1].float()

    def looked():  # (B*K, N): the last step's cross-attention of its last query, mean of layers and heads
        return torch.stack([w[:, :, -1] for w in cache.weights]).float().mean(dim=(0, 2))

    text = model.config.text
    trail = looked if attention is not None else None
    if K == 1:
        ids, maps = greedy_or_sample(step, prompt, cfg, text.sep_token_id, text.pad_token_id, generator, trail)
    else:
        ids, maps = beam_search(step, cache.reorder, prompt, B, cfg, text.sep_token_id, trail)
    if attention is not None:
        attention.extend(maps)
    return ids


def penalize(scores, seqs, n_new: int, cfg: DecodeConfig, sep: int) -> torch.Tensor:
    """Repetition penalty on every token already in `seqs` (prompt included), banned tokens (`banned`),
    and no [SEP] before min_new_tokens, in HF's order. scores: (n, vocab) logits or log-probs; seqs: (n, t)."""
    if cfg.repetition_penalty != 1.0:
        seen = scores.gather(1, seqs)
        seen = torch.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
        scores = scores.scatter(1, seqs, seen)
    if cfg.no_repeat_ngram_size or cfg.bad_words_ids:
        rows, tokens = banned(seqs.tolist(), cfg)
        if rows:
            at = dict(device=scores.device)
            scores = scores.index_put((torch.tensor(rows, **at), torch.tensor(tokens, **at)),
                                      torch.tensor(-float("inf"), **at))
    if n_new < cfg.min_new_tokens:
        scores = scores.clone()
        scores[:, sep] = -float("inf")
    return scores


def banned(seqs: list[list[int]], cfg: DecodeConfig) -> tuple[list[int], list[int]]:
    """(sequence, token) pairs that must not come next, as HF's NoRepeatNGram and NoBadWords processors:
    a token that would make an n-gram of `no_repeat_ngram_size` tokens the sequence already holds, and the
    last token of a bad word whose other tokens the sequence ends with (a one-token word: always)."""
    rows, tokens = [], []
    n = cfg.no_repeat_ngram_size
    for r, seq in enumerate(seqs):
        ban = set()
        if n and len(seq) >= n - 1:
            last = seq[len(seq) - n + 1 :] if n > 1 else []  # the n - 1 tokens a new one would complete
            ban |= {seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i : i + n - 1] == last}
        for words in cfg.bad_words_ids:
            if len(words) == 1 or (len(seq) >= len(words) - 1 and seq[len(seq) - len(words) + 1 :] == list(words[:-1])):
                ban.add(words[-1])
        rows += [r] * len(ban)
        tokens += sorted(ban)
    return rows, tokens


def nucleus(logits, cfg: DecodeConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p: logits outside the allowed set become -inf."""
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if cfg.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the tokens ranked above
        drop = before >= cfg.top_p  # the set already reached top_p without this token
        drop[:, 0] = False
        logits = logits.scatter(1, order, ordered.masked_fill(drop, -float("inf")))
    return logits


def greedy_or_sample(step, prompt, cfg: DecodeConfig, sep: int, pad: int, generator=None, looked=None):
    """-> (new ids per sequence, and with `looked` (generate_from) each sequence's (new tokens, N)
    attention maps, else None)."""
    B, P = prompt.shape
    seqs, done = prompt, torch.zeros(B, dtype=torch.bool, device=prompt.device)
    logits = step(prompt)
    maps = []  # (B, N) per step, with looked
    for t in range(cfg.max_new_tokens):
        if looked is not None:
            maps.append(looked())
        scores = penalize(logits, seqs, t, cfg, sep)
        if cfg.sample:
            probs = nucleus(scores, cfg).softmax(dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            token = scores.argmax(dim=-1)
        token = token.masked_fill(done, pad)  # finished captions only grow padding
        seqs = torch.cat([seqs, token[:, None]], dim=1)
        done |= token == sep
        if done.all() or t + 1 == cfg.max_new_tokens:
            break
        logits = step(token[:, None])
    ids = [_until_sep(s[P:].tolist(), sep) for s in seqs]
    if looked is None:
        return ids, None
    maps = torch.stack(maps, dim=1)  # (B, new tokens, N)
    return ids, [maps[b, : len(i)] for b, i in enumerate(ids)]


def beam_search(step, reorder, prompt, B: int, cfg: DecodeConfig, sep: int, looked=None):
    """Keep the K best running beams per image by summed log-prob; a beam that ends ([SEP] or the
    length limit) among the top K candidates joins the image's K finished beams, scored by
    sum(log p) / length ** length_penalty. An image stops once its best running beam, scored at
    the current length, cannot beat its worst finished beam (HF's early_stopping=False).
    Returns (new ids per image, and with `looked` each image's (new tokens, N) attention maps, which
    travel with their beams as the ids do; else None)."""
    K, P = cfg.num_beams, prompt.shape[1]
    device = prompt.device
    running = prompt.view(B, K, P)  # (B, K, t): all beams start as the prompt ...
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = NEG  # ... so only the first one is expanded at the first step
    finished = torch.zeros(B, K, P + cfg.max_new_tokens, dtype=torch.long, device=device)
    finished_len = torch.zeros(B, K, dtype=torch.long, device=device)  # new tokens of each finished beam
    finished_scores = torch.full((B, K), NEG, device=device)
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, dtype=torch.bool, device=device)
    top_k_mask = torch.arange(2 * K, device=device) < K  # only the top K candidates may finish
    batch_offset = torch.arange(B, device=device)[:, None] * K

    logits = step(prompt)
    if looked is not None:  # (B, K, new tokens, N) attention maps, kept like `running` and `finished`
        N = looked().shape[-1]
        maps = torch.zeros(B, K, 0, N, device=device)
        finished_maps = torch.zeros(B, K, cfg.max_new_tokens, N, device=device)
    for t in range(cfg.max_new_tokens):
        logp = penalize(F.log_softmax(logits, dim=-1), running.view(B * K, -1), t, cfg, sep)  # (B*K, V)
        V = logp.shape[-1]
        scores = (logp.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        # 2K candidates: at most K of them end in [SEP], so K can always keep running
        cand_scores, cand = scores.topk(2 * K, dim=-1)  # (B, 2K), best first
        parent, token = cand // V, cand % V
        cand_seqs = torch.cat([running.gather(1, parent[:, :, None].expand(-1, -1, running.shape[2])),
                               token[:, :, None]], dim=2)  # (B, 2K, t+1)
        ends = (token == sep) | (t + 1 == cfg.max_new_tokens)
        if looked is not None:  # each candidate: its parent's maps, then where the parent looked now
            step_map = looked().view(B, K, N)
            cand_maps = torch.cat([_take(maps, parent), _take(step_map, parent)[:, :, None]], dim=2)

        # finished beams: merge the candidates that end here into the K best so far
        offer = ends & top_k_mask & improvable[:, None]
        normed = torch.where(offer, cand_scores / (t + 1) ** cfg.length_penalty, -float("inf"))
        pad = torch.zeros(B, 2 * K, finished.shape[2] - cand_seqs.shape[2], dtype=torch.long, device=device)
        keep = torch.cat([finished_scores, normed], dim=1).topk(K, dim=-1).indices  # (B, K)
        finished = _take(torch.cat([finished, torch.cat([cand_seqs, pad], dim=2)], dim=1), keep)
        finished_len = _take(torch.cat([finished_len, torch.full_like(token, t + 1)], dim=1), keep)
        finished_scores = _take(torch.cat([finished_scores, normed], dim=1), keep)
        is_finished = _take(torch.cat([is_finished, offer], dim=1), keep)
        if looked is not None:
            pad_maps = torch.zeros(B, 2 * K, cfg.max_new_tokens - t - 1, N, device=device)
            finished_maps = _take(torch.cat([finished_maps, torch.cat([cand_maps, pad_maps], dim=2)], dim=1), keep)

        # running beams: the K best candidates that did not end
        live = cand_scores + ends.float() * NEG
        best = live.topk(K, dim=-1).indices  # (B, K)
        running_scores, running = _take(live, best), _take(cand_seqs, best)
        if looked is not None:
            maps = _take(cand_maps, best)
        reorder((_take(parent, best) + batch_offset).view(-1))

        # can a running beam still beat the worst finished one, scored at today's length?
        best_possible = running_scores[:, :1] / (t + 1) ** cfg.length_penalty
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, NEG)
        improvable &= (best_possible > worst).any(dim=1)
        if not improvable.any() or t + 1 == cfg.max_new_tokens:
            break
        logits = step(running[:, :, -1].reshape(B * K, 1))
    ids = [finished[b, 0, P : P + finished_len[b, 0]].tolist() for b in range(B)]
    if looked is None:
        return ids, None
    return ids, [finished_maps[b, 0, : finished_len[b, 0]] for b in range(B)]


def _take(x, index):
    """x[b, index[b, j]] for each image b: (B, M, ...) -> (B, J, ...)."""
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def _until_sep(ids: list[int], sep: int) -> list[int]:
    return ids[: ids.index(sep) + 1] if sep in ids else ids
