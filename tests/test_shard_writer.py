"""The streaming safetensors writer used by `apply` (midus_surgery/shard_writer.py).

Files it writes are read back with the safetensors library itself.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from midus_surgery.shard_writer import ShardItem, file_slice, read_header, write_shard


@pytest.fixture
def base_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.randint(0, 100, (2, 2, 2), generator=g),
    }
    path = tmp_path / "base.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def read_all(path):
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


def copied(path, name, new_name=None):
    header, start = read_header(path)
    where, dtype, shape = file_slice(path, name, header, start)
    return ShardItem(new_name or name, dtype, shape, bytes_from=where)


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_copied_and_produced_tensors_read_back_exactly(base_file, tmp_path, monkeypatch, kernel_copy):
    if not kernel_copy:  # the read/write fallback where copy_file_range is missing or refused
        def refuse(*args, **kwargs):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    path, tensors = base_file
    new = torch.arange(12, dtype=torch.float16).view(3, 4)
    items = [
        copied(path, "b", "layers.0.b"),
        ShardItem("new", "F16", (3, 4), make=lambda: new),
        copied(path, "a", "layers.0.a"),
        copied(path, "a", "layers.1.a"),  # the same source twice: a duplicated layer
        copied(path, "c"),
    ]
    seen = []
    out = tmp_path / "out.safetensors"
    written = write_shard(out, items, metadata={"format": "pt"}, on_bytes=seen.append)
    got, meta = read_all(out)
    assert meta == {"format": "pt"}
    assert set(got) == {"layers.0.b", "new", "layers.0.a", "layers.1.a", "c"}
    assert torch.equal(got["layers.0.b"], tensors["b"]) and got["layers.0.b"].dtype == torch.bfloat16
    assert torch.equal(got["layers.0.a"], tensors["a"]) and torch.equal(got["layers.1.a"], tensors["a"])
    assert torch.equal(got["c"], tensors["c"])
    assert torch.equal(got["new"], new)
    assert written == sum(seen) == sum(i.nbytes for i in items)
    (length,) = __import__("struct").unpack("<Q", out.read_bytes()[:8])
    assert (8 + length) % 8 == 0  # aligned data section, as safetensors writes it


def test_wrong_produced_tensor_is_an_error(tmp_path):
    items = [ShardItem("x", "F32", (2, 2), make=lambda: torch.zeros(2, 3))]
    with pytest.raises(ValueError, match="produced F32 \\(2, 3\\), expected F32 \\(2, 2\\)"):
        write_shard(tmp_path / "bad.safetensors", items)


def test_wrong_source_length_is_an_error(base_file, tmp_path):
    path, _ = base_file
    item = copied(path, "a")
    bad = ShardItem("a", "F32", (4, 5), bytes_from=item.bytes_from)
    with pytest.raises(ValueError, match="source holds 60 bytes, 80 expected"):
        write_shard(tmp_path / "bad.safetensors", [bad])
