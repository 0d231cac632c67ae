"""HF's way to caption a folder with BLIP in transformers 5.24, as short as it honestly goes: BlipProcessor and
generate in batches of 8, BLIP's decoding (beam 3, 5 to 20 new tokens, prompt "a picture of "), jsonl out.
(pipeline("image-to-text") fails for BLIP in 5.24: generate() is called without pixel_values.)

    python benchmarks/hf_caption_folder.py HF_MODEL_DIR FOLDER OUT.jsonl
"""

import json
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor

checkpoint, folder, output = sys.argv[1:4]
prompt = "a picture of "
model = BlipForConditionalGeneration.from_pretrained(checkpoint).eval()
processor = BlipProcessor.from_pretrained(checkpoint)
paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
with open(output, "w") as f, torch.inference_mode():
    for i in range(0, len(paths), 8):
        batch = paths[i : i + 8]
        inputs = processor(images=[Image.open(p).convert("RGB") for p in batch], text=[prompt] * len(batch),
                           return_tensors="pt")
        out = model.generate(pixel_values=inputs.pixel_values, input_ids=inputs.input_ids, num_beams=3,
                             max_new_tokens=20, min_new_tokens=5)
        for path, text in zip(batch, processor.batch_decode(out, skip_special_tokens=True), strict=True):
            caption = text.removeprefix(prompt.strip()).strip()  # the output starts with the prompt
            f.write(json.dumps({"image": str(path), "caption": caption}) + "\n")
