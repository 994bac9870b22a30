"""The checkpoint reader (checkpoint/read.py) against safetensors' own: same tensors, bit for bit, on the direct
path and on the staged one (pinned buffers on a GPU, plain ones here), and one clear error per malformed file."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from videoxl.checkpoint import read
from videoxl.errors import VideoXLError


@pytest.fixture
def shard(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(300, 70, generator=g).to(torch.bfloat16),  # 42,000 bytes: several chunks when staged
        "f32": torch.randn(5, 7, generator=g),
        "f16": torch.randn(3, generator=g).half(),
        "ids": torch.arange(11, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
    }
    path = str(tmp_path / "a.safetensors")
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("staged", [False, True])
def test_reads_equal_safetensors(shard, staged, monkeypatch):
    monkeypatch.setattr(read, "CHUNK", 4096)  # the 42,000-byte tensor crosses 11 chunks and both buffers
    want = load_file(shard)
    entries = read.header(shard)
    assert set(entries) == set(want)
    reader = read.Reader(torch.device("cpu"), staged=staged)
    try:
        for name, entry in entries.items():
            got = reader.read(entry)
            assert got.dtype == want[name].dtype and got.shape == want[name].shape, name
            # bytes compared, not values (NaN-safe, and -0.0 differs from 0.0)
            assert got.reshape(-1).view(torch.uint8).tolist() == want[name].reshape(-1).view(torch.uint8).tolist()
    finally:
        reader.close()


def test_read_all_shares_tensors_across_threads(shard):
    want = load_file(shard)
    got = {}
    read.read_all([(k, e) for k, e in read.header(shard).items()], torch.device("cpu"), 3,
                  lambda key, t, reader: got.__setitem__(key, t.clone()))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_read_all_raises_a_threads_error(shard):
    def keep(key, t, reader):
        if key == "f32":
            raise VideoXLError("boom")

    with pytest.raises(VideoXLError, match="boom"):
        read.read_all(list(read.header(shard).items()), torch.device("cpu"), 2, keep)


def write_raw(path, meta: dict, data: bytes):
    head = json.dumps(meta).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + data)


@pytest.mark.parametrize("meta,data,why", [
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "byte range"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16, "byte range"),
    ({"x": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, "unknown dtype"),
    ({"x": {"shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, "malformed"),
    ([1, 2], b"", "not a JSON object"),
])
def test_malformed_headers_are_one_line(tmp_path, meta, data, why):
    path = str(tmp_path / "bad.safetensors")
    write_raw(path, meta, data)
    with pytest.raises(VideoXLError, match=why) as e:
        read.header(path)
    assert "\n" not in str(e.value)


def test_truncated_and_garbage_files(tmp_path):
    for name, content in (("short", b"\x01\x02"), ("huge", struct.pack("<Q", 1 << 40) + b"{}"),
                          ("notjson", struct.pack("<Q", 3) + b"{x]")):
        path = str(tmp_path / f"{name}.safetensors")
        with open(path, "wb") as f:
            f.write(content)
        with pytest.raises(VideoXLError, match="unreadable safetensors file"):
            read.header(path)


def test_a_file_cut_after_its_header_was_read(shard):
    entries = read.header(shard)
    with open(shard, "r+b") as f:
        f.truncate(entries["big"].begin + 10)
    reader = read.Reader(torch.device("cpu"))
    try:
        with pytest.raises(VideoXLError, match="ended early"):
            reader.read(entries["big"])
    finally:
        reader.close()
