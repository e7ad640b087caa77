"""A sharded (DCP) checkpoint is checked before torch reads its pickles.

torch reads DCP's ``.metadata`` with plain pickle and the checkpoint's non-tensor items with
torch.load(weights_only=False). Each test first shows that its crafted file runs code when read
as torch reads it (``os.mkdir`` of a marker: a call into ``os`` that does not fork, since a fork in
this many-threaded process can deadlock its child), then that the check refuses it, without running
it, and that a resume stops with one line naming the file.
"""

from __future__ import annotations

import io
import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from midus_surgery.errors import TrainingError
from midus_surgery.train.checkpoint import load_checkpoint
from midus_surgery.train.dcp_guard import dcp_checkpoint_problem, dcp_metadata_problem


def _short_string(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def dotted_global_payload(path: str) -> bytes:
    """Protocol 4 names ``os.mkdir`` as an attribute path from an allowed-looking DCP module."""
    return (b"\x80\x04" + _short_string("torch.distributed.checkpoint.filesystem") + _short_string("os.mkdir") + b"\x93"
            + _short_string(path) + b"\x85R.")  # STACK_GLOBAL, (path,), REDUCE


class RunsCode:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


def save_sharded(folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"model": {"w": torch.arange(6.0).reshape(2, 3)}, "optimizer": {"lr": 0.1, "betas": (0.9, 0.95)}},
                 checkpoint_id=str(folder))


def plant_in_bytes_item(folder: Path, payload: bytes) -> None:
    """Point the checkpoint's ``optimizer.lr`` item at ``payload``, appended to its .distcp file."""
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # written by the test itself just above
    for index, info in metadata.storage_data.items():
        if index.fqn == "optimizer.lr":
            file = folder / info.relative_path
            info.offset, info.length = file.stat().st_size, len(payload)
            file.write_bytes(file.read_bytes() + payload)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


def torch_reads(folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.zeros(2, 3)}, "optimizer": {"lr": 0.0, "betas": (0.0, 0.0)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(folder))


def checkpoint_around(folder: Path) -> Path:
    """``folder`` as the sharded model state of a run's checkpoint ``step-00000002``."""
    ckpt = folder.parent / "step-00000002"
    ckpt.mkdir()
    folder.rename(ckpt / "pytorch_model_fsdp_0")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "samples_seen": 4, "data": {}}))
    return ckpt


def resume(ckpt: Path) -> None:
    load_checkpoint(ckpt, acc=None, optimizer=None, scheduler=None, adamw_options={}, data_identity={})


def test_a_whole_sharded_checkpoint_passes(tmp_path):
    save_sharded(tmp_path / "dcp")
    assert dcp_checkpoint_problem(tmp_path) is None
    torch_reads(tmp_path / "dcp")  # and it is a checkpoint torch reads


def test_a_dotted_name_through_a_dcp_module_is_refused(tmp_path):
    marker = tmp_path / "ran"
    payload = dotted_global_payload(str(marker))
    pickle.loads(payload)  # what torch's plain pickle.load does with it
    assert marker.exists()
    marker.rmdir()

    save_sharded(tmp_path / "dcp")
    (tmp_path / "dcp" / ".metadata").write_bytes(payload)
    problem = dcp_metadata_problem(tmp_path / "dcp" / ".metadata")
    assert "torch.distributed.checkpoint.filesystem.os.mkdir" in problem and "could run code" in problem
    with pytest.raises(TrainingError, match=r"cannot resume from .*step-00000002: pytorch_model_fsdp_0/\.metadata: .*could run code"):
        resume(checkpoint_around(tmp_path / "dcp"))
    assert not marker.exists()


def test_a_non_tensor_item_that_torch_would_unpickle_is_refused(tmp_path):
    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    torch.save(RunsCode(str(marker)), buffer)
    save_sharded(tmp_path / "dcp")
    plant_in_bytes_item(tmp_path / "dcp", buffer.getvalue())
    assert dcp_metadata_problem(tmp_path / "dcp" / ".metadata") is None  # the metadata itself is DCP's own
    torch_reads(tmp_path / "dcp")  # torch's own load runs the code (and sets lr to what it returns)
    assert marker.exists()
    marker.rmdir()

    problem = dcp_checkpoint_problem(tmp_path)
    assert problem.startswith("dcp/__0_0.distcp: item 'optimizer.lr': not plain tensors and numbers") and "could run code" in problem
    with pytest.raises(TrainingError, match=r"pytorch_model_fsdp_0/__0_0\.distcp: item 'optimizer\.lr': .*could run code"):
        resume(checkpoint_around(tmp_path / "dcp"))
    assert not marker.exists()


def test_an_item_pointing_outside_its_folder_is_refused(tmp_path):
    save_sharded(tmp_path / "dcp")
    metadata = pickle.loads((tmp_path / "dcp" / ".metadata").read_bytes())
    for index, info in metadata.storage_data.items():
        if index.fqn == "optimizer.betas":
            info.relative_path = "../elsewhere.distcp"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(metadata))
    assert "'optimizer.betas' points to '../elsewhere.distcp', not a file beside the metadata" in dcp_checkpoint_problem(tmp_path)


@pytest.mark.parametrize("offset,length", [(-1, 10), (0, 10**9), (True, 1)])
def test_an_item_outside_its_file_is_refused_in_one_line(tmp_path, offset, length):
    """trial92 F9: the unpickler admits DCP's _StorageInfo with any numbers: an offset of -1 made seek raise
    OSError (no file name), which the CLI re-raised as a traceback."""
    save_sharded(tmp_path / "dcp")
    metadata = pickle.loads((tmp_path / "dcp" / ".metadata").read_bytes())
    for index, info in metadata.storage_data.items():
        if index.fqn == "optimizer.lr":
            info.offset, info.length = offset, length
            size = (tmp_path / "dcp" / info.relative_path).stat().st_size
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(metadata))
    said = f"dcp/__0_0.distcp: item 'optimizer.lr' claims bytes at offset {offset!r}, length {length!r}, outside the file ({size} bytes): a corrupt checkpoint"
    assert dcp_checkpoint_problem(tmp_path) == said
    with pytest.raises(TrainingError, match=r"pytorch_model_fsdp_0/__0_0\.distcp: item 'optimizer\.lr' claims bytes .* a corrupt checkpoint"):
        resume(checkpoint_around(tmp_path / "dcp"))


@pytest.mark.parametrize("descriptors,said", [(7, "names 7 as its transforms"), ([1, 2], "names [1, 2] as its transforms")])
def test_transform_descriptors_that_are_not_names_are_refused_in_one_line(tmp_path, descriptors, said):
    """trial95 F7: the unpickler admits DCP's _StorageInfo with any transform_descriptors: 7 made the refusal's own
    ', '.join a TypeError traceback."""
    save_sharded(tmp_path / "dcp")
    metadata = pickle.loads((tmp_path / "dcp" / ".metadata").read_bytes())
    for index, info in metadata.storage_data.items():
        if index.fqn == "optimizer.lr":
            info.transform_descriptors = descriptors
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(metadata))
    assert dcp_checkpoint_problem(tmp_path) == f"dcp/item 'optimizer.lr' {said}, not a list of their names: a corrupt checkpoint"
    with pytest.raises(TrainingError, match=r"'optimizer\.lr' names .* as its transforms"):
        resume(checkpoint_around(tmp_path / "dcp"))


def test_any_other_malformed_field_is_refused_in_one_line(tmp_path):
    """Any field of a value the unpickler admitted that is not what DCP writes (here a file name longer than the
    system takes, whose look-up is an OSError pathlib does not swallow) is one line, not a traceback."""
    save_sharded(tmp_path / "dcp")
    metadata = pickle.loads((tmp_path / "dcp" / ".metadata").read_bytes())
    for index, info in metadata.storage_data.items():
        if index.fqn == "optimizer.lr":
            info.relative_path = "x" * 300
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(metadata))
    said = dcp_checkpoint_problem(tmp_path)
    assert said.startswith("dcp/not DCP metadata torch could read (") and "name too long" in said and "\n" not in said
