"""tnas.files and tnas.checkpoints: atomic writes, checkpoints that load without running code."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tnas.checkpoints import load_checkpoint, save_checkpoint
from tnas.errors import TnasError
from tnas.files import atomic_write_bytes, atomic_write_json


def test_atomic_writes_leave_only_the_file(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"first")
    atomic_write_bytes(tmp_path / "a.bin", b"second")
    atomic_write_json(tmp_path / "sub" / "r.json", {"accuracy_mean": 51.2, "per_episode": [1, 2]})
    assert (tmp_path / "a.bin").read_bytes() == b"second"
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {
        "accuracy_mean": 51.2, "per_episode": [1, 2]}
    names = sorted(p.name for p in tmp_path.rglob("*"))
    assert names == ["a.bin", "r.json", "sub"]


def test_failed_atomic_write_keeps_old_file(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "r.json", {"bad": object()})
    assert json.loads((tmp_path / "r.json").read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_checkpoint_round_trip_with_rng_state(tmp_path):
    rng = np.random.RandomState(5)
    state = {"weights": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 12,
             "numpy_rng": rng.get_state(), "torch_rng": torch.get_rng_state()}
    expected_next = rng.rand(3)
    save_checkpoint(state, tmp_path / "last.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["step"] == 12
    assert torch.equal(loaded["weights"]["w"], state["weights"]["w"])
    restored = np.random.RandomState()
    restored.set_state(loaded["numpy_rng"])
    np.testing.assert_array_equal(restored.rand(3), expected_next)
    assert torch.equal(loaded["torch_rng"], state["torch_rng"])


@pytest.mark.parametrize("content, hint", [
    (json.dumps({"normal": [["sep_conv_3x3", 0]], "normal_concat": [2]}).encode(), True),  # a genotype file
    (np.random.default_rng(0).bytes(512), False),  # random bytes
    (b"\x80\x04\x95garbage", False),  # a pickle, but not torch's
], ids=["json", "random_bytes", "foreign_pickle"])
def test_a_file_that_is_no_checkpoint_says_so_in_one_line(tmp_path, content, hint):
    """Not a torch file at all: one line that says so (not a refusal naming the first byte as a pickle
    opcode, "it names 123"), pointing a JSON file to --genotype."""
    path = tmp_path / "genotype.json"
    path.write_bytes(content)
    with pytest.raises(TnasError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"cannot read checkpoint {path}: it is not a torch checkpoint")
    assert ("a genotype file goes to --genotype" in message) == hint
    assert "refusing" not in message and "it names" not in message and "\n" not in message


def test_loading_allows_the_numpy_builders_for_that_load_only(tmp_path):
    """The numpy types of older RNG states are allowed inside load_checkpoint, not in torch.load after it
    (torch's process-wide allow-list is left as it was, on every supported torch)."""
    before = set(torch.serialization.get_safe_globals())  # a set inside torch: its order may change
    path = tmp_path / "old.pt"
    save_checkpoint({"numpy_rng": np.random.RandomState(1).get_state()}, path)
    assert load_checkpoint(path)["numpy_rng"][0] == "MT19937"
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        torch.load(path, weights_only=True)


def test_truncated_checkpoint_names_path(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint({"w": torch.randn(100, 100)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(TnasError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "cannot read checkpoint" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_checkpoint_damaged_after_saving_is_refused_not_loaded_with_wrong_weights(tmp_path):
    """One flipped byte inside a tensor: torch.load itself reads the file and returns the changed weight;
    tnas checks the CRC-32 torch.save stored for each record and refuses the file in one line."""
    path = tmp_path / "best.pt"
    weights = torch.arange(256, dtype=torch.float32)
    save_checkpoint({"w": weights}, path)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(weights.numpy().tobytes()) + 4 * 100 + 3  # the high byte of w[100]
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["w"], weights)  # torch does not notice
    with pytest.raises(TnasError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"cannot read checkpoint {path}: it is damaged (its record ") and "\n" not in message


@pytest.mark.parametrize("offset, value", [(8, 9), (6, 1)], ids=["deflate64", "encrypted"])
def test_a_foreign_zip_whose_record_zipfile_cannot_read_is_one_line(tmp_path, offset, value):
    """A zip torch.save never writes (a record compressed with deflate64, or marked encrypted): zipfile raises
    NotImplementedError / RuntimeError when the checksums are checked, which was a traceback; torch.load
    then refuses the file in one line."""
    import io
    import struct
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", b"not a pickle" * 10)
    data = bytearray(buffer.getvalue())
    for header, shift in ((b"PK\x03\x04", 0), (b"PK\x01\x02", 2)):  # the local and central headers
        at = bytes(data).find(header) + offset + shift
        data[at:at + 2] = struct.pack("<H", value)
    path = tmp_path / "foreign.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(TnasError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"cannot read checkpoint {path}: ") and "\n" not in str(info.value)


@pytest.mark.skipif(not hasattr(torch.serialization, "set_crc32_options"), reason="torch without the option")
def test_a_checkpoint_saved_without_checksums_still_loads(tmp_path):
    """torch.save under set_crc32_options(False) stores CRC 0 for every record: nothing to check, no error."""
    path = tmp_path / "nocrc.pt"
    torch.serialization.set_crc32_options(False)
    try:
        save_checkpoint({"w": torch.arange(4.0)}, path)
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(4.0))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(TnasError, match="checkpoint not found: .*missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
