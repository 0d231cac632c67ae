"""The tool around BLIP: the Captioner API (captioner.py), data layouts (data.py), metrics and the
training report, weight conversion (convert.py, names.py), the generated data sets (shapes.py, pitch.py), --trace,
attention maps, caption files, the cache of image tokens. It uses blip/ (the model) and never the
other way round."""
