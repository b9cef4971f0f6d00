"""The sharded writer: headers safetensors and transformers read, atomic publish, byte-exact mirroring."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from fourier_convert.errors import OutputError
from fourier_convert.io.safetensors_file import read_header
from fourier_convert.io.writer import (
    CheckpointWriter,
    RangeCopy,
    TensorSpec,
    build_header,
    coalesce,
    layout_shards,
    plan_groups,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "b.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.ids": torch.arange(7, dtype=torch.int64),
        "d.half": torch.randn(2, 2, 2, generator=g).half(),
    }


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_written_shards_round_trip_through_safetensors(tmp_path: Path) -> None:
    tensors = _tensors()
    specs = [
        TensorSpec(
            k,
            {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64", torch.float16: "F16"}[v.dtype],
            tuple(v.shape),
        )
        for k, v in tensors.items()
    ]
    layouts = layout_shards(plan_groups(specs, 60))
    assert len(layouts) > 1
    out = tmp_path / "out"
    with CheckpointWriter(out) as w:
        w.begin(layouts)
        for lay in layouts:
            for spec in lay.specs:
                w.write_tensor(lay.filename, spec.name, _bytes(tensors[spec.name]))
        w.commit(index_metadata={"note": "kept"})
    loaded: dict[str, torch.Tensor] = {}
    for lay in layouts:
        loaded.update(load_file(str(out / lay.filename)))
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"note": "kept", "total_size": sum(s.nbytes for s in specs)}
    assert set(index["weight_map"]) == set(tensors)
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize(
    ("name", "indexed"),
    [("model.safetensors", False), ("model-00001-of-00001.safetensors", True), ("weights.safetensors", True)],
)
def test_one_file_gets_an_index_unless_it_has_the_single_file_name(tmp_path: Path, name: str, indexed: bool) -> None:
    """transformers finds a weights file without an index only as model.safetensors."""
    tensor = torch.arange(6, dtype=torch.float32)
    layouts = layout_shards([[TensorSpec("w", "F32", (6,))]], names=[name])
    with CheckpointWriter(tmp_path / "out") as w:
        w.begin(layouts)
        w.write_tensor(name, "w", _bytes(tensor))
        w.commit()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [name, *(["model.safetensors.index.json"] if indexed else [])]
    )
    assert torch.equal(load_file(str(tmp_path / "out" / name))["w"], tensor)


def test_a_writer_without_weights_writes_no_index(tmp_path: Path) -> None:
    with CheckpointWriter(tmp_path / "out") as w:
        w.begin([])
        w.write_file("model.onnx", b"graph")
        w.commit()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model.onnx"]


def test_mirrored_shard_reuses_the_header_byte_for_byte(tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    save_file(_tensors(), str(src), metadata={"format": "pt"})
    st = read_header(src)
    specs = [TensorSpec(t.name, t.dtype, t.shape) for t in st.tensors.values()]
    (lay,) = layout_shards([specs], mirror=[st], names=["copy.safetensors"])
    assert lay.header == st.header_bytes
    out = tmp_path / "out"
    with CheckpointWriter(out) as w:
        w.begin([lay])
        w.copy(
            coalesce(
                RangeCopy(src, t.start, lay.filename, lay.offsets[t.name], t.nbytes, (t.name,))
                for t in st.tensors.values()
            )
        )
        w.commit()
    assert (out / "copy.safetensors").read_bytes() == src.read_bytes()


def test_coalesce_merges_contiguous_ranges() -> None:
    p = Path("x")
    ranges = [
        RangeCopy(p, 100, "f", 10, 5, ("a",)),
        RangeCopy(p, 105, "f", 15, 5, ("b",)),
        RangeCopy(p, 200, "f", 20, 1, ("c",)),
    ]
    merged = coalesce(ranges)
    assert [(r.src_offset, r.dst_offset, r.length, r.tensors) for r in merged] == [
        (100, 10, 10, ("a", "b")),
        (200, 20, 1, ("c",)),
    ]


def test_header_is_aligned_and_parseable(tmp_path: Path) -> None:
    header, offsets = build_header([TensorSpec("w", "F32", (3,))], {"format": "pt"})
    assert len(header) % 8 == 0
    path = tmp_path / "h.safetensors"
    path.write_bytes(header + b"\0" * 12)
    assert load_file(str(path))["w"].tolist() == [0.0, 0.0, 0.0]
    assert offsets["w"] == len(header)


def test_incomplete_output_is_never_published(tmp_path: Path) -> None:
    out = tmp_path / "out"
    layouts = layout_shards([[TensorSpec("w", "F32", (2,))]])
    with pytest.raises(OutputError, match="planned tensors were not written"), CheckpointWriter(out) as w:
        w.begin(layouts)
        w.commit()
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_exception_inside_block_removes_the_temporary_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), CheckpointWriter(out) as w:
        w.begin(layout_shards([[TensorSpec("w", "F32", (2,))]]))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_whole_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(OutputError, match="exists and is not empty"):
        CheckpointWriter(out).__enter__()
    layouts = layout_shards([[TensorSpec("w", "F32", (1,))]])
    with CheckpointWriter(out, overwrite=True) as w:
        w.begin(layouts)
        w.write_tensor("model.safetensors", "w", _bytes(torch.ones(1)))
        w.commit()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_wrong_tensor_size_is_refused(tmp_path: Path) -> None:
    with CheckpointWriter(tmp_path / "out") as w:
        w.begin(layout_shards([[TensorSpec("w", "F32", (2,))]]))
        wanted = r"computed bytes 0\.\.12, the plan says 8 in all \(parts come in order; 0 written\)"
        with pytest.raises(OutputError, match=wanted):
            w.write_tensor("model.safetensors", "w", b"\0" * 12)
        w.write_tensor("model.safetensors", "w", b"\0" * 4)  # a first part
        with pytest.raises(OutputError, match="planned tensors were not written"):
            w.commit()
    assert not (tmp_path / "out").exists()


def test_tensor_written_in_parts(tmp_path: Path) -> None:
    """The CUDA merge streams a weight out through small pinned buffers: parts land in order at their offsets."""
    values = torch.arange(6, dtype=torch.float32)
    raw = _bytes(values)
    with CheckpointWriter(tmp_path / "out") as w:
        w.begin(layout_shards([[TensorSpec("a", "F32", (1,)), TensorSpec("w", "F32", (6,))]]))
        w.write_tensor("model.safetensors", "a", _bytes(torch.ones(1)))
        w.write_tensor("model.safetensors", "w", raw[:8])
        with pytest.raises(OutputError, match=r"computed bytes 4\.\.8, .*8 written"):
            w.write_tensor("model.safetensors", "w", raw[4:8], at=4)  # out of order
        w.write_tensor("model.safetensors", "w", raw[8:20], at=8)
        w.write_tensor("model.safetensors", "w", raw[20:], at=20)
        w.commit()
    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["w"], values)


def test_coalesce_is_linear_in_the_number_of_tensors() -> None:
    """200,000 zero-size tensors in one shard (a hostile but valid file) took minutes with tuple concatenation."""
    import time

    from fourier_convert.io.writer import RangeCopy, coalesce

    copies = [RangeCopy(Path("s"), 10 * (i // 1000), "d", 50 + 10 * (i // 1000), 0, (f"t{i}",)) for i in range(200_000)]
    copies += [RangeCopy(Path("s"), 10 * k, "d", 50 + 10 * k, 10, (f"w{k}",)) for k in range(200)]
    start = time.perf_counter()
    runs = coalesce(copies)
    assert time.perf_counter() - start < 5.0
    assert len(runs) == 1 and runs[0].length == 2000 and len(runs[0].tensors) == 200_200


def test_an_output_filled_by_another_run_meanwhile_is_never_replaced(tmp_path: Path) -> None:
    """Two runs into one --out without --overwrite: both find it empty at the start; the second to finish must
    not replace the first's output."""
    out = tmp_path / "out"
    with pytest.raises(OutputError) as info, CheckpointWriter(out) as w:
        w.begin([])
        w.write_file("model.onnx", b"mine")
        out.mkdir()
        (out / "model.onnx").write_bytes(b"the other run's")
        w.commit()
    assert str(info.value) == (
        f"{out}: appeared or filled up while this run was writing (another run?); nothing was published; "
        "choose another --out or pass --overwrite"
    )
    assert (out / "model.onnx").read_bytes() == b"the other run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("kind", ["empty", "full", "dangling"])
def test_a_linked_output_is_written_where_the_link_points(tmp_path: Path, kind: str) -> None:
    """--out a symlink: the output lands in the folder the link names (an empty one, a full one with
    --overwrite, or one that does not exist yet); the link stays, and nothing is left beside either."""
    target = tmp_path / "disk" / "elsewhere"
    if kind != "dangling":
        target.mkdir(parents=True)
    if kind == "full":
        (target / "old.txt").write_text("replaced")
    out = tmp_path / "out"
    out.symlink_to(target)
    with CheckpointWriter(out, overwrite=kind == "full") as w:
        w.begin([])
        w.write_file("model.onnx", b"graph")
        w.commit()
    assert out.is_symlink() and [p.name for p in target.iterdir()] == ["model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "out"]
    assert [p.name for p in (tmp_path / "disk").iterdir()] == ["elsewhere"]


def test_a_linked_full_output_without_overwrite_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("kept")
    out = tmp_path / "out"
    out.symlink_to(target)
    with pytest.raises(OutputError) as info, CheckpointWriter(out) as w:
        w.begin([])
    assert str(info.value) == (
        f"{out} (a link to {target}): exists and is not empty; choose another --out or pass --overwrite"
    )
    assert (target / "keep.txt").read_text() == "kept"


def test_copy_sparse_keeps_the_bytes_and_the_holes(tmp_path: Path) -> None:
    """A 1 GB sparse file with 5 bytes of data (a notes file beside the weights, say) is copied in a moment and
    stays sparse: the dense copy of a 20 GB one took 41 s and 21 GB of disk."""
    from fourier_convert.io.writer import copy_sparse

    src, dst = tmp_path / "notes.txt", tmp_path / "copy.txt"
    with open(src, "wb") as f:
        f.truncate(10**9)
        f.seek(123_456_789)
        f.write(b"hello")
    start = time.perf_counter()
    copy_sparse(src, dst)
    assert time.perf_counter() - start < 5
    assert dst.stat().st_size == 10**9
    assert dst.stat().st_blocks * 512 < 10**7  # holes stay holes (a dense copy would take 1 GB)
    with open(dst, "rb") as f:
        f.seek(123_456_789 - 3)
        assert f.read(11) == b"\0\0\0hello\0\0\0"
    small = tmp_path / "config.json"
    small.write_bytes(b'{"a": 1}')
    copy_sparse(small, tmp_path / "config-copy.json")
    assert (tmp_path / "config-copy.json").read_bytes() == b'{"a": 1}'


def test_a_second_interrupt_during_clean_up_does_not_cut_it_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two Ctrl-C presses: the second arrived while the writer removed its .partial folder, and left it behind
    (while stderr said nothing was published). Interrupts wait for the clean-up, then count."""
    import os
    import shutil
    import signal

    import fourier_convert.io.writer as writer_module

    real = shutil.rmtree

    def interrupted_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler at the next bytecode: inside the clean-up
        for _ in range(1000):
            pass
        real(path, *args, **kwargs)

    monkeypatch.setattr(writer_module.shutil, "rmtree", interrupted_rmtree)
    layouts = layout_shards([[TensorSpec("w", "F32", (6,))]], names=["model.safetensors"])
    with pytest.raises(KeyboardInterrupt), CheckpointWriter(tmp_path / "out") as w:
        w.begin(layouts)
        raise KeyboardInterrupt  # the first Ctrl-C
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
