"""convert_weights.py: HF snapshots and original BLIP files in, our folder out, and back to HF."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertTokenizerFast, BlipForConditionalGeneration

import convert_weights
from blip import BlipCaptioner, Tokenizer
from blip.checkpoint import CheckpointError, load_model
from conftest import make_hf_model, save_hf_snapshot

ROOT = Path(__file__).resolve().parent.parent


def run_cli(capsys, *args) -> tuple[int, str]:
    code = convert_weights.main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, *fragments):
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]


def same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_round_trip_hf_ours_hf_is_bit_identical(hf_tiny, ours_tiny, tmp_path, capsys):
    hf, snapshot = hf_tiny
    code, err = run_cli(capsys, "--to-hf", ours_tiny, tmp_path / "hf")
    assert code == 0, err
    again, info = BlipForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    same_tensors(hf.state_dict(), again.state_dict())
    same_tensors(load_file(snapshot / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors"))
    # HF's tokenizer reads the exported files and agrees with ours, [DEC] included
    hf_tok = BertTokenizerFast.from_pretrained(tmp_path / "hf")
    ours_tok = Tokenizer.from_file(ours_tiny)
    assert hf_tok.convert_tokens_to_ids("[DEC]") == ours_tok.dec_id
    assert hf_tok("a red dog [DEC]")["input_ids"] == ours_tok.encode("a red dog [DEC]")


def test_loading_takes_the_files_weights_without_drawing_any(ours_tiny):
    """load_model builds the model on the meta device and takes the file's tensors as its parameters:
    no random number is drawn (building a model draws from torch's generator), and every weight is the
    file's, on the CPU."""
    from blip.checkpoint import read_config

    state = torch.get_rng_state()
    model = load_model(ours_tiny, BlipCaptioner)
    assert torch.equal(torch.get_rng_state(), state)  # nothing initialised, then overwritten
    BlipCaptioner(read_config(ours_tiny))
    assert not torch.equal(torch.get_rng_state(), state)  # as building the model the plain way would
    saved = load_file(str(ours_tiny / "model.safetensors"))
    weights = model.state_dict()
    assert weights.keys() == saved.keys()
    for name, tensor in weights.items():
        assert tensor.device.type == "cpu" and torch.equal(tensor, saved[name]), name
    assert all(not p.is_meta and p.requires_grad for p in model.parameters())  # trainable, as built
    assert not any(b.is_meta for b in model.buffers())


def test_loading_in_bf16_converts_each_weight(ours_tiny):
    """load_model(dtype=bf16) (what `caption.py --dtype bf16` loads): every floating-point weight is the
    file's, rounded to bf16, one weight at a time; the rest keeps its dtype."""
    model = load_model(ours_tiny, BlipCaptioner, dtype=torch.bfloat16)
    saved = load_file(str(ours_tiny / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        want = saved[name].to(torch.bfloat16) if saved[name].is_floating_point() else saved[name]
        assert tensor.dtype == want.dtype and torch.equal(tensor, want), name


def test_bin_snapshot_with_tied_weights_converts_the_same(hf_tiny, ours_tiny, vocab_dir, tmp_path, capsys):
    """Older hub files are pytorch_model.bin and store the tied LM-head weights and position_ids."""
    hf, snapshot = hf_tiny
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"].clone()
    state["text_decoder.bert.embeddings.position_ids"] = torch.arange(64)[None]
    assert "text_decoder.cls.predictions.decoder.weight" in state
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    for name in ("config.json", "vocab.txt"):
        (folder / name).write_text((snapshot / name).read_text())
    code, err = run_cli(capsys, folder, tmp_path / "ours")
    assert code == 0, err
    same_tensors(load_file(ours_tiny / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors"))
    # a file whose "tied" weights are not equal cannot be one BLIP model
    state["text_decoder.cls.predictions.decoder.weight"] += 1
    torch.save(state, folder / "pytorch_model.bin")
    code, err = run_cli(capsys, folder, tmp_path / "ours2")
    assert_one_line_error(code, err, "decoder.weight differs")


def original_state(hf_state: dict) -> dict:
    """HF names -> the original Salesforce layout, written from the documented key names."""
    renames = [
        ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
        ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
        ("vision_model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj."),
        ("vision_model.encoder.layers.", "visual_encoder.blocks."),
        (".layer_norm1.", ".norm1."), (".self_attn.qkv.", ".attn.qkv."),
        (".self_attn.projection.", ".attn.proj."), (".layer_norm2.", ".norm2."),
        ("vision_model.post_layernorm.", "visual_encoder.norm."),
    ]
    out = {}
    for k, v in hf_state.items():
        if k.startswith("vision_model."):
            for a, b in renames:
                k = k.replace(a, b)
        out[k] = v.clone()
    out["text_decoder.cls.predictions.decoder.bias"] = out["text_decoder.cls.predictions.bias"]
    # what a pretraining checkpoint holds besides the captioner
    out["text_encoder.bert.embeddings.word_embeddings.weight"] = torch.zeros(4, 4)
    out["visual_encoder_m.cls_token"] = torch.zeros(1, 1, 4)
    out["vision_proj.weight"] = torch.zeros(2, 4)
    out["temp"] = torch.tensor(0.07)
    out["image_queue"] = torch.zeros(4, 8)
    return out


def test_original_pth_equals_hf_path(tokenizer, vocab_dir, tmp_path, capsys):
    hf = make_hf_model(tokenizer, size="tiny-hd64")
    ours_tiny = tmp_path / "from_hf"
    assert run_cli(capsys, save_hf_snapshot(hf, tokenizer, vocab_dir, tmp_path / "hf"), ours_tiny)[0] == 0
    path = tmp_path / "model_base_caption_capfilt_large.pth"
    torch.save({"model": original_state(hf.state_dict()), "epoch": 4}, path)
    code, err = run_cli(capsys, path, tmp_path / "ours")
    assert_one_line_error(code, err, "--tokenizer")
    code, err = run_cli(capsys, path, tmp_path / "ours", "--tokenizer", vocab_dir / "vocab.txt")
    assert code == 0, err
    same_tensors(load_file(ours_tiny / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors"))
    a, b = load_model(ours_tiny, BlipCaptioner).config, load_model(tmp_path / "ours", BlipCaptioner).config
    assert b.vision.ln_eps == 1e-6  # the original ViT's eps, where HF configs say 1e-5
    b.vision.ln_eps = a.vision.ln_eps
    assert a == b


def test_image_size_resamples_positions_like_hf(hf_tiny, tmp_path, capsys, tokenizer):
    hf, snapshot = hf_tiny
    code, err = run_cli(capsys, snapshot, tmp_path / "ours", "--image-size", 96)
    assert code == 0, err
    ours = BlipCaptioner.from_pretrained(tmp_path / "ours")
    assert ours.config.vision.image_size == 96 and ours.visual_encoder.pos_embed.shape[1] == 37
    pixels = torch.randn(2, 3, 96, 96)
    ids, mask = tokenizer.batch(["a red dog", "a cat on a street"])
    with torch.no_grad():
        a = ours(pixels, ids, mask)
        b = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, interpolate_pos_encoding=True).logits
    assert (a - b).abs().max() <= 1e-5
    code, err = run_cli(capsys, snapshot, tmp_path / "x", "--image-size", 100)
    assert_one_line_error(code, err, "multiple of the patch size 16")


# --- bad input: one clear line, never a traceback -----------------------------------------
def copy_snapshot(snapshot: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in snapshot.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_files(hf_tiny, ours_tiny, tmp_path, capsys):
    _, snapshot = hf_tiny
    code, err = run_cli(capsys, tmp_path / "nowhere", tmp_path / "out")
    assert_one_line_error(code, err, "not found", "nowhere")
    folder = copy_snapshot(snapshot, tmp_path / "a")
    (folder / "model.safetensors").unlink()
    code, err = run_cli(capsys, folder, tmp_path / "out")
    assert_one_line_error(code, err, "has none of model.safetensors")
    (folder / "config.json").unlink()
    code, err = run_cli(capsys, folder, tmp_path / "out")
    assert_one_line_error(code, err, "no config.json")
    folder = copy_snapshot(snapshot, tmp_path / "b")
    (folder / "vocab.txt").unlink()
    code, err = run_cli(capsys, folder, tmp_path / "out")
    assert_one_line_error(code, err, "no tokenizer.json or vocab.txt")
    ours = copy_snapshot(ours_tiny, tmp_path / "ours")
    (ours / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_model(ours, BlipCaptioner)
    with pytest.raises(CheckpointError, match="not a BlipCaptioner checkpoint"):
        load_model(snapshot, BlipCaptioner)  # an HF folder is not ours: it must be converted first
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_model(tmp_path / "nowhere", BlipCaptioner)


def test_unknown_missing_and_misshapen_weights(hf_tiny, tmp_path, capsys):
    _, snapshot = hf_tiny
    state = load_file(snapshot / "model.safetensors")
    cases = {
        "unknown weight vision_model.extra.weight": {**state, "vision_model.extra.weight": torch.zeros(2)},
        "missing weight text_decoder.layers.1.mlp.fc2.bias": {
            k: v for k, v in state.items() if k != "text_decoder.bert.encoder.layer.1.output.dense.bias"},
        "has shape (63, 64), the config needs (64, 64)": {
            **state, "text_decoder.bert.encoder.layer.0.attention.self.query.weight": torch.zeros(63, 64)},
    }
    for i, (message, bad) in enumerate(cases.items()):
        folder = copy_snapshot(snapshot, tmp_path / f"s{i}")
        save_file(bad, folder / "model.safetensors")
        code, err = run_cli(capsys, folder, tmp_path / f"o{i}")
        assert_one_line_error(code, err, message)
    # a config that disagrees with the weights
    folder = copy_snapshot(snapshot, tmp_path / "cfg")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli(capsys, folder, tmp_path / "o")
    assert_one_line_error(code, err, "mlp.fc1.weight has shape (256, 64), the config needs (128, 64)")
    # a vocab that does not belong to these weights
    folder = copy_snapshot(snapshot, tmp_path / "voc")
    lines = (folder / "vocab.txt").read_text().splitlines()
    (folder / "vocab.txt").write_text("\n".join(lines[:-5]) + "\n")
    code, err = run_cli(capsys, folder, tmp_path / "o")
    assert_one_line_error(code, err, "does not match the model's")
    # garbage where the weights should be
    folder = copy_snapshot(snapshot, tmp_path / "junk")
    (folder / "model.safetensors").write_bytes(b"\x00not a safetensors file")
    code, err = run_cli(capsys, folder, tmp_path / "o")
    assert_one_line_error(code, err, "cannot read safetensors")


class RunsCode:
    """A pickle that would run a shell command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(hf_tiny, tmp_path, capsys):
    _, snapshot = hf_tiny
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": RunsCode(marker)}}, path)
    code, err = run_cli(capsys, path, tmp_path / "o", "--tokenizer", snapshot / "vocab.txt")
    assert_one_line_error(code, err, "refused", "could run code")
    folder = copy_snapshot(snapshot, tmp_path / "bin")
    (folder / "model.safetensors").unlink()
    torch.save(RunsCode(marker), folder / "pytorch_model.bin")
    code, err = run_cli(capsys, folder, tmp_path / "o")
    assert_one_line_error(code, err, "refused")
    assert not marker.exists()


def test_hub_id_without_huggingface_hub(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    code, err = run_cli(capsys, "Salesforce/blip-image-captioning-base", tmp_path / "o")
    assert_one_line_error(code, err, "huggingface_hub is not installed", "--local-dir")


def test_cli_process_help_and_error():
    """The script as users run it: --help works, a bad path is one line on stderr, exit code 1."""
    cmd = [sys.executable, str(ROOT / "convert_weights.py")]
    out = subprocess.run(cmd + ["--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--image-size" in out.stdout and "--to-hf" in out.stdout
    out = subprocess.run(cmd + ["no/such/folder/x", "out"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("error:")


def test_presets_equal_hub_configs():
    """Our base/large presets are what the hub configs of blip-image-captioning-base/-large describe."""
    from transformers import BlipConfig as HFConfig

    from blip.config import base, large
    from blip.tool.convert import config_from_hf

    hub_base = HFConfig(text_config={"num_attention_heads": 12})
    hub_large = HFConfig(text_config={"num_attention_heads": 12}, vision_config={
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16})
    assert config_from_hf(hub_base.to_dict(), "base") == base()
    assert config_from_hf(hub_large.to_dict(), "large") == large()
    assert config_from_hf({"model_type": "blip"}, "defaults").text.heads == 8  # HF's class default, kept
