"""blip/speed/memory.py: a training process keeps freed memory; a loaded checkpoint's weights give back
their pages once packed, and never lose a change."""

import mmap
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model import batch

from blip import BlipCaptioner
from blip.checkpoint import load_model
from blip.speed import linear
from blip.speed.memory import drop_file_pages

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's /proc and madvise")


def resident_pages(t: torch.Tensor) -> int:
    """How many of the whole pages inside `t` are in memory (bit 63 of /proc/self/pagemap)."""
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start // page * 8)
        entries = torch.frombuffer(bytearray(f.read((end - start) // page * 8)), dtype=torch.int64)
    return int((entries < 0).sum())  # bit 63 is the sign bit


@pytest.fixture
def mapped(tmp_path):
    """A 2 MB tensor as a checkpoint loads it (the file's pages), read once, and its values."""
    values = torch.randn(512, 1024)
    save_file({"w": values}, str(tmp_path / "w.safetensors"))
    t = load_file(str(tmp_path / "w.safetensors"))["w"]
    assert t.sum().item() == values.sum().item()  # read: its pages are in memory
    return t, values


@linux
def test_a_files_pages_are_dropped_and_read_again(mapped):
    t, values = mapped
    assert resident_pages(t) > 500
    assert drop_file_pages(t)
    assert resident_pages(t) == 0
    assert torch.equal(t, values)  # read again from the file


@linux
def test_written_pages_are_never_dropped(mapped):
    t, values = mapped
    t[300, 7] = 5.0  # one page becomes the process's own copy
    assert not drop_file_pages(t)
    assert resident_pages(t) > 500
    assert t[300, 7] == 5.0 and torch.equal(t[:300], values[:300])


def test_other_memory_is_left_alone():
    t = torch.randn(512, 1024)
    assert not drop_file_pages(t)
    assert not drop_file_pages(t[:0])


@linux
@pytest.mark.skipif(not linear.AVAILABLE, reason="this PyTorch has no oneDNN linear")
def test_packed_checkpoint_weights_are_in_memory_once(ours_tiny, tokenizer, monkeypatch):
    """Captioning with the packed path gives back the checkpoint's pages of the weights it packed; the
    weights still read as the file's."""
    monkeypatch.setattr(linear, "ONEDNN", True)
    dropped = {}  # weight -> whole pages resident right after drop_file_pages (later reads of its file
    # neighbours, such as a bias, may map some back: the kernel maps cached pages around a fault)

    def drop(t):
        dropped[t] = drop_file_pages(t) and resident_pages(t)
        return dropped[t] is not False

    monkeypatch.setattr(linear, "drop_file_pages", drop)
    model = load_model(ours_tiny, BlipCaptioner)
    file = BlipCaptioner.from_pretrained(ours_tiny).state_dict()
    fc1 = model.visual_encoder.blocks[0].mlp.fc1.weight
    fc1.sum()
    assert resident_pages(fc1) > 0
    with torch.no_grad():
        model(*batch(tokenizer))
    assert dropped[fc1] == 0
    assert all(torch.equal(v, file[k]) for k, v in model.state_dict().items())


@linux
@pytest.mark.skipif(not linear.AVAILABLE, reason="this PyTorch has no oneDNN linear")
def test_trained_then_captioned_keeps_the_trained_weights(ours_tiny, tokenizer, monkeypatch):
    """Fine-tuning a loaded checkpoint writes its weights in place (fused AdamW); captioning with the
    packed path afterwards must not drop those pages back to the file's values."""
    monkeypatch.setattr(linear, "ONEDNN", True)
    model = load_model(ours_tiny, BlipCaptioner).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model.loss(*batch(tokenizer)).backward()
    opt.step()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        model(*batch(tokenizer))
    assert model.visual_encoder.blocks[0].mlp.fc1.packed.packed is not None  # the packed path ran
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


KEEP = """
import resource, sys
import torch
from blip.speed.memory import keep_freed_memory
if not keep_freed_memory():
    print("unsupported")
    sys.exit()
mb, count = int(sys.argv[1]), int(sys.argv[2])
faults = []
for _ in range(8):  # as a training step or a captioning batch: tensors made, written, then all freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.empty(mb * 2**18).fill_(1.0) for _ in range(count)]  # count x mb MB
    del tensors
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[4:]))
"""


@pytest.mark.parametrize("mb, count", [(8, 10), (113, 2)])
def test_freed_memory_is_reused_without_page_faults(mb, count):
    """After the first rounds the heap holds what a round needs, no fresh pages: blocks of 8 MB (a training
    step's; with glibc's default settings about every other such process trims the heap after each round and
    maps 20,000 fresh pages the next one) and of 113 MB (the ViT's MLP at a captioning batch of 16; glibc maps
    each block over 32 MB anew, 29,000 fresh pages a block, whatever its threshold is set to)."""
    out = subprocess.run([sys.executable, "-c", KEEP, str(mb), str(count)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent).stdout.strip()
    if out == "unsupported":
        pytest.skip("not glibc on Linux")
    assert int(out) < 100
