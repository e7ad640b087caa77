"""The streaming safetensors writer used by `apply` (midus_surgery/io/shard_writer.py).

Files it writes are read back with the safetensors library itself.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from midus_surgery.io.shard_writer import ShardItem, file_slice, read_header, write_shard


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


@pytest.fixture
def layered_base(tmp_path):
    """A base whose layers hold two large tensors (>= 64 KiB, whole pages) between two norms of
    6144 bytes, as in a bf16 Llama-3.2-3B block: copies land page-aligned only if the writer
    arranges it."""
    g = torch.Generator().manual_seed(0)

    def bf16(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    tensors = {"w_embed": bf16(320, 256)}  # 160 KiB, stored after the layers (save_file sorts by name)
    for i in range(6):
        tensors[f"layers.{i}.a_norm"] = bf16(3072)
        tensors[f"layers.{i}.b_proj"] = bf16(256, 160)
        tensors[f"layers.{i}.c_proj"] = bf16(192, 256)
        tensors[f"layers.{i}.d_norm"] = bf16(3072)
    path = tmp_path / "base.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def dus_items(path):
    """Output layers 0-3 from base layers 0-3, then 4-7 from base layers 2-5: a duplicated span."""
    header, start = read_header(path)
    items = [copied(path, "w_embed")]
    for out_layer, src_layer in enumerate([0, 1, 2, 3, 2, 3, 4, 5]):
        for part in ("a_norm", "b_proj", "c_proj", "d_norm"):
            items.append(copied(path, f"layers.{src_layer}.{part}", f"layers.{out_layer}.{part}"))
    return items


@pytest.mark.parametrize("reverse", [False, True], ids=["plan-order", "reversed"])
def test_layout_puts_large_copies_at_their_source_offset_within_a_page(layered_base, tmp_path, monkeypatch, reverse):
    path, tensors = layered_base
    items = dus_items(path)[::-1] if reverse else dus_items(path)
    calls = []
    real_copy = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a) or real_copy(*a))
    out = tmp_path / "out.safetensors"
    write_shard(out, items)
    got, _ = read_all(out)
    for item in items:  # every tensor reads back under its output name
        layer = item.name.split(".")
        source = f"layers.{[0, 1, 2, 3, 2, 3, 4, 5][int(layer[1])]}.{layer[2]}" if layer[0] == "layers" else item.name
        assert torch.equal(got[item.name], tensors[source]), item.name
    header, data_start = read_header(out)
    large = [item for item in items if item.nbytes >= 64 << 10]
    aligned_wide = 0
    for item in large:
        dst = data_start + header[item.name]["data_offsets"][0]
        assert dst % 4096 == item.bytes_from.offset % 4096, item.name
        aligned_wide += item.nbytes * (dst % 65536 == item.bytes_from.offset % 65536)
    assert aligned_wide >= sum(i.nbytes for i in large) / 2  # the bulk also matches modulo 64 KiB
    # source-adjacent tensors move together: far fewer copies than tensors
    assert len(calls) < len(items) / 2, len(calls)  # one per tensor (or two, head + body) without merging
    assert data_start % 8 == 0 and out.read_bytes()[8:data_start].rstrip(b" ").endswith(b"}")


def test_layout_is_deterministic(layered_base, tmp_path):
    path, _ = layered_base
    write_shard(tmp_path / "a.safetensors", dus_items(path))
    write_shard(tmp_path / "b.safetensors", dus_items(path))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


@pytest.mark.parametrize("seed", range(12))
def test_any_mix_of_copies_and_produced_tensors_reads_back_exactly(tmp_path, seed):
    """Whatever order the layout picks, every tensor reads back under its name: random sizes
    (whole pages and odd ones), duplicated sources, produced tensors, two source files."""
    g = torch.Generator().manual_seed(seed)
    sizes = [int(n) for n in torch.randint(1, 40_000, (10,), generator=g)]
    sources = {}
    for f in range(2):
        tensors = {f"t{k}": torch.randn(n + (16384 if k % 3 == 0 else 0), generator=g) for k, n in enumerate(sizes)}
        path = tmp_path / f"base{f}.safetensors"
        save_file(tensors, str(path))
        sources[path] = tensors
    items, expected = [], {}
    for k in range(30):
        if int(torch.randint(0, 5, (1,), generator=g)) == 0:
            value = torch.randn(int(torch.randint(1, 5000, (1,), generator=g)), generator=g)
            items.append(ShardItem(f"new{k}", "F32", tuple(value.shape), make=lambda v=value: v))
            expected[f"new{k}"] = value
            continue
        path = list(sources)[int(torch.randint(0, 2, (1,), generator=g))]
        name = f"t{int(torch.randint(0, len(sizes), (1,), generator=g))}"
        items.append(copied(path, name, f"out{k}"))
        expected[f"out{k}"] = sources[path][name]
    out = tmp_path / "out.safetensors"
    assert write_shard(out, items) == sum(i.nbytes for i in items)
    got, _ = read_all(out)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_a_full_disk_while_a_shard_is_written_names_the_shard(tmp_path, monkeypatch):
    """A file object's write raises ENOSPC without a file name: apply's "the disk is full" named neither the file nor
    the disk (trial83 F9). The error now carries the shard's path, which the CLI's line shows."""
    import errno

    from midus_surgery.io import shard_writer

    def full(out, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shard_writer, "_write_all", full)
    path = tmp_path / "model.safetensors"
    with pytest.raises(OSError) as info:
        write_shard(path, [ShardItem("w", "F32", (2,), make=lambda: torch.zeros(2))])
    assert info.value.filename == str(path) and info.value.errno == errno.ENOSPC
