"""Images: loading and the transforms BLIP's captioner expects."""

# CLIP's normalisation statistics, which BLIP and HF's BlipImageProcessor use
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
