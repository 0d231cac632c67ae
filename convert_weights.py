"""Convert BLIP captioning weights into our checkpoint folder, or ours back to HF format.

    python convert_weights.py path/to/blip-image-captioning-base checkpoints/blip-base
    python convert_weights.py model_base_caption_capfilt_large.pth checkpoints/blip-base --tokenizer vocab.txt
    python convert_weights.py Salesforce/blip-image-captioning-base checkpoints/blip-base   # needs huggingface_hub
    python convert_weights.py --to-hf checkpoints/my-finetune hf/my-finetune
    python convert_weights.py --merge-lora runs/mine/best checkpoints/mine   # train.py --lora's adapters + base
"""

import argparse
import re
import sys
from pathlib import Path

from blip.checkpoint import CheckpointError
from blip.tool.convert import convert, download, export_hf, merge_adapters


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert BLIP captioning or image-text retrieval weights (HF snapshot folder, original BLIP "
        ".pth, or HF hub id) into our checkpoint folder (config.json, model.safetensors, tokenizer.json); or, "
        "with --to-hf, export our folder back to a BlipForConditionalGeneration / BlipForImageTextRetrieval "
        "snapshot.",
    )
    p.add_argument("src", nargs="?", help="HF snapshot folder, original BLIP .pth file, or hub id like "
                   "Salesforce/blip-image-captioning-base")
    p.add_argument("out", nargs="?", help="output folder for our checkpoint")
    p.add_argument("--tokenizer", metavar="FILE", help="vocab.txt or tokenizer.json (needed for an original .pth; "
                   "overrides the snapshot's own tokenizer files)")
    p.add_argument("--image-size", type=int, metavar="N", help="resample the ViT position embeddings for N x N "
                   "input images (bicubic; N a multiple of the patch size)")
    p.add_argument("--to-hf", nargs=2, metavar=("OURS", "OUT_HF"), help="export our checkpoint folder OURS to "
                   "an HF snapshot folder OUT_HF")
    p.add_argument("--merge-lora", nargs=2, metavar=("LORA_DIR", "OUT"), help="fold the adapters of a train.py --lora "
                   "folder into the checkpoint they belong to, and write the whole model to OUT (a checkpoint "
                   "folder caption.py, train.py and --to-hf take)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if (args.to_hf or args.merge_lora) and (args.src or args.out):
        p.error("--to-hf and --merge-lora take their own two folders; give no SRC/OUT with them")
    if args.to_hf and args.merge_lora:
        p.error("give --to-hf or --merge-lora, not both (--to-hf takes a LoRA folder as it is)")
    if not (args.to_hf or args.merge_lora) and not (args.src and args.out):
        p.error("give SRC and OUT (or --to-hf OURS OUT_HF, or --merge-lora LORA_DIR OUT)")
    try:
        if args.merge_lora:
            merge_adapters(*args.merge_lora)
            print(f"wrote {args.merge_lora[1]}: {args.merge_lora[0]}'s adapters merged into their base checkpoint")
            return 0
        if args.to_hf:
            export_hf(*args.to_hf)
            print(f"wrote HF snapshot {args.to_hf[1]}")
            return 0
        src = Path(args.src)
        if not src.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", args.src):
            src = download(args.src)
        model = convert(src, args.out, args.tokenizer, args.image_size)
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(p.numel() for p in model.parameters())
    v = model.config.vision
    print(f"wrote {args.out}: {n / 1e6:.1f} M parameters, ViT {v.width}x{v.depth} at {v.image_size} px, "
          f"vocab {model.config.text.vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
