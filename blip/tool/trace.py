"""`caption.py img.jpg --trace`: what happens to an image on its way to a caption, stage by stage, with
the shapes the tensors really have (read by forward hooks while the caption is made, not computed).

    with Trace(model, tokenizer) as trace:
        captioner.caption([image])
    print("\\n".join(trace.lines))
"""

from ..tokenizer import Tokenizer


def shape(t) -> str:
    return "(" + ", ".join(str(n) for n in t.shape) + ")"


class Trace:
    """Collects one line per stage: pixels, patches, ViT blocks, image tokens, the decoder's image
    keys/values, then per decoding step its input tokens, cache length, cross-attention and logits."""

    def __init__(self, model, tokenizer: Tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.lines, self.hooks, self.step = [], [], 0
        self.current = None  # the decoder step being traced: its line so far

    def say(self, stage: str, what: str):
        self.lines.append(f"{stage:<24s} {what}")

    def __enter__(self):
        vit, decoder = self.model.visual_encoder, self.model.text_decoder
        v = vit.cfg

        def pixels(module, args):
            self.say("pixels", shape(args[0]))

        def patches(module, args, out):
            p = v.patch_size
            self.say("patches", f"{shape(out)}  conv {p}x{p}, stride {p}: a {v.grid} x {v.grid} grid, "
                     f"each patch a {v.width}-vector")

        def tokens(module, args):
            self.say("+ class token, positions", shape(args[0]))

        def blocks(module, args, out):
            self.say(f"ViT blocks x {len(vit.blocks)}", f"{shape(out)}  each: LayerNorm, self-attention "
                     f"({v.heads} heads), LayerNorm, MLP {v.width}->{v.mlp_dim}->{v.width}")

        def image_tokens(module, args, out):
            self.say("image tokens", f"{shape(out)}  after the final LayerNorm")

        for module, hook in [(vit, pixels), (vit.blocks[0], tokens)]:
            self.hooks.append(module.register_forward_pre_hook(hook))
        self.hooks.append(decoder.register_forward_pre_hook(self.decoder_step, with_kwargs=True))
        for module, hook in [(vit.patch_embed, patches), (vit.blocks[-1], blocks), (vit.norm, image_tokens),
                             (decoder.layers[0].cross_attn, self.cross_attention), (decoder.head, self.logits)]:
            self.hooks.append(module.register_forward_hook(hook))  # each kept at once: __exit__ removes them all
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        return False

    def decoder_step(self, module, args, kwargs):
        cache, tokens = kwargs.get("cache"), args[0]
        if cache is None:
            return
        if cache.length == 0:
            k_t, v = cache.image_kv[0]
            self.say("cross-attention k/v", f"{len(cache.image_kv)} layers x keys {shape(k_t)} (images, heads, head "
                     f"width, image tokens: transposed once), values {shape(v)}, once per image, shared by its beams")
            self.say("decoder steps", "input ids (one row per beam), self-attention cache length, "
                     "cross-attention queries, logits")
        rows = tokens.tolist()
        words = " | ".join(self.tokenizer.pieces(row) for row in rows[:4]) + (" | ..." if len(rows) > 4 else "")
        cached = cache.length
        self.current = f"{shape(tokens):<8s} {words:<34s} cache {cached:>2d} -> {cached + tokens.shape[1]:<3d}"

    def cross_attention(self, module, args, out):
        if self.current is not None:
            self.current += f" q {shape(args[0])}"

    def logits(self, module, args, out):
        if self.current is not None:
            self.say(f"  step {self.step}", f"{self.current} logits {shape(out)}")
            self.step += 1
            self.current = None
