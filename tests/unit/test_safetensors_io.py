"""Safetensors files: the one streaming writer (single files, atomically; Hugging Face folders),
the loader and the header reader."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from deepscaler import safetensors_io as S
from deepscaler.safetensors_io import load_tensors, read_safetensors_header, save_tensors
from deepscaler.store import CorruptFileError, DiskFull


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype the project stores, odd sizes (alignment), scalars, empty and strided ones."""
    g = torch.Generator().manual_seed(0)
    return {
        "z.f32": torch.randn(3, 4, generator=g),
        "a.bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "m.i64": torch.arange(6).reshape(2, 3),
        "noncontig": torch.randn(4, 3, generator=g).t(),
        "bool": torch.tensor([True, False, True]),
        "u8": torch.randint(0, 255, (7,), dtype=torch.uint8, generator=g),
        "f16": torch.randn(2, 2, 2, generator=g).half(),
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "i32": torch.arange(5, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16),
        "i8": torch.arange(-2, 3, dtype=torch.int8),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "b.f32": torch.randn(1, generator=g),
    }


# --------------------------------------------------------------------------- save_tensors / load_tensors


def test_tensor_roundtrip_with_metadata(tmp_path: Path) -> None:
    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "i64": torch.arange(6).reshape(2, 3),
        "noncontig": torch.randn(4, 3).t(),
        "bool": torch.tensor([True, False]),
    }
    p = save_tensors(tmp_path / "r" / "shard0.safetensors", tensors, {"step": "3", "info": json.dumps({"a": 1})})
    loaded = load_tensors(p)
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    assert read_safetensors_header(p)["__metadata__"] == {"step": "3", "info": '{"a": 1}'}
    assert [q.name for q in p.parent.iterdir()] == ["shard0.safetensors"]


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}, {"k": "é\n\x01 \"q\""}])
def test_save_tensors_writes_what_the_library_writes(tmp_path: Path, metadata) -> None:
    """Byte for byte what safetensors.torch.save_file wrote before (same order, same header),
    so nothing that reads the files can tell the writers apart."""
    import safetensors.torch

    tensors = mixed_tensors()
    ours = save_tensors(tmp_path / "ours.safetensors", tensors, metadata)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "lib.safetensors"),
                                metadata=metadata)
    assert ours.read_bytes() == (tmp_path / "lib.safetensors").read_bytes()


def test_save_tensors_aligns_every_tensor(tmp_path: Path) -> None:
    p = save_tensors(tmp_path / "x.safetensors", mixed_tensors())
    header = read_safetensors_header(p)  # the data starts at a multiple of 8 (padded header)
    for name, info in header.items():
        if name != "__metadata__":
            assert info["data_offsets"][0] % S._ST_SIZES[info["dtype"]] == 0, name


def test_tensor_metadata_must_be_strings(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="str to str"):
        save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {"step": 3})  # type: ignore[dict-item]
    assert not list(tmp_path.iterdir())


def test_tensors_sharing_memory_are_refused(tmp_path: Path) -> None:
    """As save_file refuses them: tied weights written twice would load as two tensors."""
    w = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=re.escape("['embed', 'head'] share memory")):
        save_tensors(tmp_path / "x.safetensors", {"embed": w, "head": w})
    with pytest.raises(RuntimeError, match="share memory"):
        save_tensors(tmp_path / "x.safetensors", {"all": w, "row": w[1]})
    assert not list(tmp_path.iterdir())
    flat = torch.arange(10.0)  # disjoint views of one buffer are fine, as for the library
    p = save_tensors(tmp_path / "x.safetensors", {"a": flat[:4], "b": flat[4:]})
    assert torch.equal(load_tensors(p)["b"], flat[4:])


def test_save_tensors_is_atomic(tmp_path: Path) -> None:
    """A real full disk (a 1 MiB tmpfs): the old file stays whole and no temp file is left."""
    from tests.helpers.mounts import tmpfs

    fs = tmp_path / "fs"
    fs.mkdir()
    with tmpfs(fs, "1M"):
        p = save_tensors(fs / "x.safetensors", {"a": torch.zeros(3)})
        old = p.read_bytes()
        with pytest.raises(DiskFull) as info:
            save_tensors(p, {"a": torch.ones(1 << 20)})  # 4 MiB
        assert str(info.value).startswith(str(p)) and "no space left on device" in str(info.value)
        assert "\n" not in str(info.value)
        assert p.read_bytes() == old and [q.name for q in fs.iterdir()] == ["x.safetensors"]


def test_tensor_files_take_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        p = save_tensors(tmp_path / "t.safetensors", {"a": torch.zeros(2)})
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("damage", ["truncate", "header", "empty", "garbage"])
def test_corrupt_safetensors_one_line_error(tmp_path: Path, damage: str) -> None:
    p = save_tensors(tmp_path / "x.safetensors", {"a": torch.arange(1000, dtype=torch.float32)})
    data = p.read_bytes()
    p.write_bytes({"truncate": data[:-100], "header": data[:20], "empty": b"", "garbage": b"hello" * 20}[damage])
    with pytest.raises(CorruptFileError) as info:
        load_tensors(p)
    msg = str(info.value)
    assert msg.startswith(str(p)) and "corrupt or truncated safetensors" in msg and "\n" not in msg
    with pytest.raises(CorruptFileError) as info:  # the header reader says so too, without the data
        read_safetensors_header(p)
    msg = str(info.value)
    assert msg.startswith(str(p)) and ("truncated" in msg or "corrupt" in msg) and "\n" not in msg


def test_missing_tensor_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such tensor file"):
        load_tensors(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="missing safetensors file"):
        read_safetensors_header(tmp_path / "nope.safetensors")


def test_no_pickle_in_safetensors_io() -> None:
    src = Path(S.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+pickle", src, re.M)
    assert not re.search(r"(?<![\w.])torch\.(load|save)\(", src)


# --------------------------------------------------------------------------- the streaming writer


def test_write_safetensors_matches_the_library(tmp_path):
    """Our streaming writer produces files the safetensors library reads back exactly."""
    import safetensors.torch

    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f32": torch.randn(7),
        "f16": torch.randn(2, 2, 2).half(),
        "i64": torch.arange(5),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "bool": torch.tensor([True, False, True]),
        "strided": torch.randn(4, 6)[:, ::2].contiguous(),
    }
    size = S.write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"format": "pt"})
    assert size == (tmp_path / "x.safetensors").stat().st_size
    back = safetensors.torch.load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    with safetensors.safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    header = read_safetensors_header(tmp_path / "x.safetensors")
    assert [k for k in header if k != "__metadata__"] == list(tensors)  # the caller's order


def test_plan_shards_greedy():
    assert S.plan_shards({"a": 4, "b": 4, "c": 4}, 8) == [["a", "b"], ["c"]]
    assert S.plan_shards({"big": 20, "a": 1}, 8) == [["big"], ["a"]]  # oversize tensor alone
    assert S.plan_shards({"a": 1}, 10**9) == [["a"]]


def test_write_safetensors_folder(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    (tmp_path / "one").mkdir()
    assert S.write_safetensors_folder(tmp_path / "one", tensors) == ["model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["model.safetensors"]
    (tmp_path / "sharded").mkdir()
    files = S.write_safetensors_folder(tmp_path / "sharded", tensors, max_shard_bytes=800, total_parameters=7)
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)] + ["model.safetensors.index.json"]
    index = json.loads((tmp_path / "sharded" / S.INDEX_NAME).read_text())
    assert index["metadata"] == {"total_size": 2000, "total_parameters": 7}
    assert index["weight_map"] == {"t0": files[0], "t1": files[0], "t2": files[1], "t3": files[1], "t4": files[2]}
    for f in files[:3]:
        loaded = load_tensors(tmp_path / "sharded" / f)
        assert all(torch.equal(v, tensors[k]) for k, v in loaded.items())
