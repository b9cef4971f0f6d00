"""Calibration data (``fourier_convert.io.calibration``): every format read as the model's own tokenizer or image
processor would prepare it, reproducible selection and split, batching, and every error's exact one-line
message."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import fourier_convert.io.calibration as calibration
import fourier_convert.io.calibration.tensors as calibration_tensors
from fourier_convert.errors import InputFileError, UsageError
from fourier_convert.io.calibration import CalibrationData, batches, collate, pad_token_id, read_calibration

from .conftest import FIXTURES

LLAMA = FIXTURES / "llama" / "base"
ROBERTA = FIXTURES / "roberta" / "base"
VIT = FIXTURES / "vit" / "base"


@cache
def config_of(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "config.json").read_text())
    return data


@cache
def tokenizer_of(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@cache
def processor_of(folder: Path) -> Any:
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(folder))  # type: ignore[no-untyped-call]


def read(path: Path, model: Path = LLAMA, **kwargs: Any) -> CalibrationData:
    return read_calibration(path, model, config_of(model), **kwargs)


def error_of(path: Path, model: Path = LLAMA, **kwargs: Any) -> str:
    with pytest.raises(InputFileError) as info:
        read(path, model, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message
    return message


def usage_error_of(path: Path, model: Path = LLAMA, **kwargs: Any) -> str:
    with pytest.raises(UsageError) as info:
        read(path, model, **kwargs)
    return str(info.value)


def ids(sample: dict[str, torch.Tensor]) -> list[int]:
    out: list[int] = sample["input_ids"].tolist()
    return out


def all_samples(data: CalibrationData) -> list[dict[str, torch.Tensor]]:
    return data.train + data.held_out


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def numbered(path: Path, n: int) -> Path:
    return write_lines(path, [f"sample number {i} says hello" for i in range(n)])


def make_png(path: Path, size: tuple[int, int] = (8, 6), color: tuple[int, int, int] = (200, 10, 10)) -> Path:
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return path


# -- formats ------------------------------------------------------------------------------------------------------


def test_text_file_gives_the_tokenizers_own_ids(tmp_path: Path) -> None:
    path = tmp_path / "calib.txt"
    path.write_bytes(
        b"\xef\xbb\xbfThe first line.\r\n\n   \nSecond line, with \xc3\xa9 accents.\nthird line without end"
    )
    data = read(path, held_out=0)
    tok = tokenizer_of(LLAMA)
    texts = ["The first line.", "Second line, with é accents.", "third line without end"]
    assert data.kind == "text" and data.source == path and data.truncated == 0
    assert data.held_out == []
    assert [ids(s) for s in data.train] == [tok(t)["input_ids"] for t in texts]
    for sample in data.train:
        assert set(sample) == {"input_ids", "attention_mask"}
        assert sample["input_ids"].dtype == torch.long and sample["attention_mask"].dtype == torch.long
        assert sample["attention_mask"].tolist() == [1] * len(ids(sample))
    assert data.notes == ["3 samples, none held out (--held-out 0): the report has no held-out measure"]


def test_file_without_extension_is_text(tmp_path: Path) -> None:
    data = read(write_lines(tmp_path / "calib", ["alpha", "beta"]), held_out=0)
    assert data.kind == "text"
    assert [ids(s) for s in data.train] == [tokenizer_of(LLAMA)(t)["input_ids"] for t in ("alpha", "beta")]


@pytest.mark.parametrize("name", ["calib.jsonl", "calib.json", "CALIB.JSONL"])
def test_jsonl(tmp_path: Path, name: str) -> None:
    path = write_lines(
        tmp_path / name,
        [
            json.dumps({"text": "one sample", "label": 3}),
            "",
            json.dumps({"text": ""}),
            json.dumps({"text": "  "}),
            json.dumps({"label": 1, "text": "another one\nwith a newline inside"}),
        ],
    )
    data = read(path, ROBERTA, held_out=0)
    tok = tokenizer_of(ROBERTA)
    assert data.kind == "jsonl"
    assert [ids(s) for s in data.train] == [
        tok("one sample")["input_ids"],
        tok("another one\nwith a newline inside")["input_ids"],
    ]
    assert data.notes[0] == "2 lines with an empty 'text' skipped"


def test_jsonl_text_field(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"prompt": p}) for p in ("a b c", "d e f")])
    data = read(path, text_field="prompt", held_out=0)
    assert [ids(s) for s in data.train] == [tokenizer_of(LLAMA)(t)["input_ids"] for t in ("a b c", "d e f")]


def test_safetensors_input_ids(tmp_path: Path) -> None:
    input_ids = torch.randint(0, 256, (4, 6), dtype=torch.int32)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 6, [1] + [0] * 5], dtype=torch.int64)
    types = torch.zeros(4, 6, dtype=torch.int64)
    path = tmp_path / "ids.safetensors"
    save_file({"input_ids": input_ids, "attention_mask": mask, "token_type_ids": types}, str(path))
    data = read(path, held_out=0)
    assert data.kind == "safetensors" and data.truncated == 0
    assert [ids(s) for s in data.train] == input_ids.tolist()
    assert [s["attention_mask"].tolist() for s in data.train] == mask.tolist()
    assert all(s["input_ids"].dtype == torch.long and "token_type_ids" in s for s in data.train)


def test_safetensors_without_mask_gets_ones(tmp_path: Path) -> None:
    path = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.arange(12).reshape(3, 4)}, str(path))
    data = read(path, held_out=0)
    assert [s["attention_mask"].tolist() for s in data.train] == [[1, 1, 1, 1]] * 3
    assert all(s["attention_mask"].dtype == torch.long for s in data.train)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.uint32, torch.uint64])
def test_safetensors_integer_dtypes(tmp_path: Path, dtype: torch.dtype) -> None:
    path = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.tensor([[1, 2, 255], [0, 7, 9]]).to(dtype)}, str(path))
    data = read(path, held_out=0)
    assert [ids(s) for s in data.train] == [[1, 2, 255], [0, 7, 9]]
    assert all(s["input_ids"].dtype == torch.long for s in data.train)


def test_safetensors_bool_mask(tmp_path: Path) -> None:
    path = tmp_path / "ids.safetensors"
    mask = torch.tensor([[True, False], [True, True]])
    save_file({"input_ids": torch.ones(2, 2, dtype=torch.int64), "attention_mask": mask}, str(path))
    data = read(path, held_out=0)
    assert [s["attention_mask"].tolist() for s in data.train] == [[1, 0], [1, 1]]


def test_safetensors_pixel_values(tmp_path: Path) -> None:
    pixels = torch.randn(3, 3, 32, 32, dtype=torch.float16)
    path = tmp_path / "px.safetensors"
    save_file({"pixel_values": pixels}, str(path))
    data = read(path, VIT, held_out=0)
    assert data.kind == "safetensors"
    assert all(s["pixel_values"].dtype == torch.float32 for s in data.train)
    assert torch.equal(torch.stack([s["pixel_values"] for s in data.train]), pixels.float())


def test_image_folder(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    make_png(folder / "b.png", (10, 7), (0, 200, 0))
    make_png(folder / "a.PNG", (5, 9), (10, 20, 30))
    from PIL import Image

    Image.new("RGB", (12, 12), (1, 2, 3)).save(folder / "c.JPG", format="JPEG")
    Image.new("L", (6, 6), 128).save(folder / "d.bmp")
    make_png(folder / ".hidden.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.png").mkdir()  # a folder named like an image
    data = read(folder, VIT, held_out=0)
    assert data.kind == "images"
    processor = processor_of(VIT)
    names = ["a.PNG", "b.png", "c.JPG", "d.bmp"]
    expected = [
        processor(images=Image.open(folder / n).convert("RGB"), return_tensors="pt")["pixel_values"][0] for n in names
    ]
    assert len(data.train) == 4
    for sample, want in zip(data.train, expected, strict=True):
        assert list(sample) == ["pixel_values"] and sample["pixel_values"].shape == (3, 32, 32)
        assert torch.equal(sample["pixel_values"], want)
    assert data.notes[0] == f"1 file in {folder} ignored (not an image)"


# -- selection and split ------------------------------------------------------------------------------------------


def test_same_seed_same_split_other_seed_differs(tmp_path: Path) -> None:
    path = numbered(tmp_path / "c.txt", 40)

    def split(seed: int) -> tuple[list[list[int]], list[list[int]]]:
        data = read(path, samples=20, seed=seed)
        return [ids(s) for s in data.train], [ids(s) for s in data.held_out]

    assert split(0) == split(0)
    assert split(7) == split(7)
    assert split(0) != split(1)
    assert split(0)[1] != split(1)[1]


def test_split_is_in_file_order_and_covers_every_sample(tmp_path: Path) -> None:
    path = numbered(tmp_path / "c.txt", 10)
    tok = tokenizer_of(LLAMA)
    order = [tok(f"sample number {i} says hello")["input_ids"] for i in range(10)]
    data = read(path, held_out=0.3, seed=3)
    train, held = [order.index(ids(s)) for s in data.train], [order.index(ids(s)) for s in data.held_out]
    assert train == sorted(train) and held == sorted(held)
    assert sorted(train + held) == list(range(10))
    assert data.notes == ["10 samples: 7 to fit, 3 held out for the report"]


@pytest.mark.parametrize(
    ("n", "held_out", "n_held"),
    [(10, 0.2, 2), (10, 0.0, 0), (10, 0.9, 9), (10, 0.04, 1), (2, 0.2, 1), (2, 0.9, 1), (3, 0.5, 2), (5, 0.1, 1)],
)
def test_held_out_sizes(tmp_path: Path, n: int, held_out: float, n_held: int) -> None:
    data = read(numbered(tmp_path / "c.txt", n), held_out=held_out)
    assert (len(data.train), len(data.held_out)) == (n - n_held, n_held)


def test_samples_picks_a_subset_in_file_order(tmp_path: Path) -> None:
    path = numbered(tmp_path / "c.txt", 30)
    tok = tokenizer_of(LLAMA)
    order = [tok(f"sample number {i} says hello")["input_ids"] for i in range(30)]
    data = read(path, samples=8, held_out=0, seed=5)
    picked = [order.index(ids(s)) for s in data.train]
    assert len(picked) == 8 and picked == sorted(picked) and picked != list(range(8))
    assert data.notes[0] == "used 8 of the 30 samples, picked with seed 5 (--calibration-samples)"
    other = [order.index(ids(s)) for s in read(path, samples=8, held_out=0, seed=6).train]
    assert other != picked


def test_samples_more_than_there_are(tmp_path: Path) -> None:
    data = read(numbered(tmp_path / "c.txt", 4), samples=10)
    assert len(all_samples(data)) == 4
    assert data.notes[0] == "--calibration-samples 10 asks for more samples than the 4 there are; using all 4"


def test_images_selected(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        make_png(folder / f"{i}.png", (4 + i, 4), (i * 30, 0, 0))
    data = read(folder, VIT, samples=4, held_out=0.25, seed=2)
    assert (len(data.train), len(data.held_out)) == (3, 1)
    assert data.notes == [
        "used 4 of the 6 samples, picked with seed 2 (--calibration-samples)",
        "4 samples: 3 to fit, 1 held out for the report",
    ]


def test_safetensors_rows_selected_and_split(tmp_path: Path) -> None:
    path = tmp_path / "ids.safetensors"
    rows = torch.arange(60).reshape(20, 3)
    save_file({"input_ids": rows}, str(path))
    data = read(path, samples=10, held_out=0.2, seed=1)
    assert (len(data.train), len(data.held_out)) == (8, 2)
    got = sorted(ids(s)[0] // 3 for s in all_samples(data))
    assert len(set(got)) == 10 and got == sorted(got)
    again = read(path, samples=10, held_out=0.2, seed=1)
    assert [ids(s) for s in again.train] == [ids(s) for s in data.train]
    assert [ids(s) for s in again.held_out] == [ids(s) for s in data.held_out]


def test_max_samples_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "MAX_SAMPLES", 5)
    path = numbered(tmp_path / "c.txt", 9)
    data = read(path, held_out=0)
    tok = tokenizer_of(LLAMA)
    assert [ids(s) for s in data.train] == [tok(f"sample number {i} says hello")["input_ids"] for i in range(5)]
    assert data.notes[0] == "the file holds more than 5 samples; used the first 5 (up to line 5), the rest was not read"
    # exactly MAX_SAMPLES samples and trailing blank lines: no note
    write_lines(path, [f"s {i}" for i in range(5)] + ["", "  "])
    assert not any("more than" in n for n in read(path, held_out=0).notes)


# -- truncation ---------------------------------------------------------------------------------------------------


def test_truncation_is_the_tokenizers_and_is_noted(tmp_path: Path) -> None:
    long = "a fairly long line of text that has many more than eight tokens in it"
    path = write_lines(tmp_path / "c.txt", [long, "short", long + " again"])
    data = read(path, ROBERTA, max_length=8, held_out=0)
    tok = tokenizer_of(ROBERTA)
    assert data.truncated == 2
    assert [ids(s) for s in data.train] == [
        tok(long, truncation=True, max_length=8)["input_ids"],
        tok("short")["input_ids"],
        tok(long + " again", truncation=True, max_length=8)["input_ids"],
    ]
    assert ids(data.train[0])[-1] == tok.eos_token_id  # the special token at the end is kept
    assert data.notes[0] == "2 of 3 lines were cut to 8 tokens (--max-length)"


def test_exact_max_length_is_not_counted_as_cut(tmp_path: Path) -> None:
    tok = tokenizer_of(LLAMA)
    line = "hello world"
    n = len(tok(line)["input_ids"])
    data = read(write_lines(tmp_path / "c.txt", [line, line]), max_length=n, held_out=0)
    assert data.truncated == 0 and ids(data.train[0]) == tok(line)["input_ids"]


# -- collate, batches, pad id -------------------------------------------------------------------------------------


def test_collate_pads_right_and_masks_padding() -> None:
    a = {
        "input_ids": torch.tensor([5, 6, 7]),
        "attention_mask": torch.tensor([1, 1, 1]),
        "token_type_ids": torch.tensor([1, 1, 1]),
    }
    b = {"input_ids": torch.tensor([8]), "attention_mask": torch.tensor([1]), "token_type_ids": torch.tensor([1])}
    batch = collate([a, b], pad_token_id=9)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_collate_of_read_samples(tmp_path: Path) -> None:
    data = read(write_lines(tmp_path / "c.txt", ["a", "a much longer line than the first"]), held_out=0)
    pad = pad_token_id(LLAMA, config_of(LLAMA))
    batch = collate(data.train, pad)
    lengths = [len(ids(s)) for s in data.train]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["input_ids"][0, lengths[0] :].tolist() == [pad] * (max(lengths) - lengths[0])


def test_collate_stacks_images_and_refuses_mixed_samples() -> None:
    px = [{"pixel_values": torch.full((3, 4, 4), float(i))} for i in range(3)]
    assert collate(px, 0)["pixel_values"].shape == (3, 3, 4, 4)
    with pytest.raises(ValueError, match="cannot stack 'pixel_values'"):
        collate([px[0], {"pixel_values": torch.zeros(3, 5, 5)}], 0)
    with pytest.raises(ValueError, match="keys"):
        collate([px[0], {"input_ids": torch.tensor([1])}], 0)
    with pytest.raises(ValueError, match="at least one sample"):
        collate([], 0)


def test_batches_in_order() -> None:
    samples = [
        {"input_ids": torch.tensor([i] * (i + 1)), "attention_mask": torch.ones(i + 1, dtype=torch.long)}
        for i in range(5)
    ]
    out = list(batches(samples, 2, pad_token_id=0))
    assert [b["input_ids"].shape for b in out] == [(2, 2), (2, 4), (1, 5)]
    assert [row[0] for b in out for row in b["input_ids"].tolist()] == [0, 1, 2, 3, 4]
    assert list(batches([], 4, 0)) == []
    with pytest.raises(ValueError, match="batch_size"):
        list(batches(samples, 0, 0))


def test_pad_token_id(tmp_path: Path) -> None:
    assert pad_token_id(LLAMA, config_of(LLAMA)) == tokenizer_of(LLAMA).pad_token_id == 3
    assert pad_token_id(ROBERTA, config_of(ROBERTA)) == 1
    assert pad_token_id(VIT, config_of(VIT)) == 0
    bare = tmp_path / "bare"
    bare.mkdir()
    assert pad_token_id(bare, {"pad_token_id": 7, "eos_token_id": 2}) == 7
    assert pad_token_id(bare, {"pad_token_id": None, "eos_token_id": [5, 6]}) == 5
    assert pad_token_id(bare, {"text_config": {"pad_token_id": 4}}) == 4
    assert pad_token_id(bare, {}) == 0
    (bare / "tokenizer.json").write_text("{broken")  # an unloadable tokenizer falls back to the config
    assert pad_token_id(bare, {"eos_token_id": 2}) == 2


# -- option errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"samples": 1},
            "--calibration-samples: is 1, needs at least 2 samples: one to fit, one to report on; "
            "raise it, or leave it out to use every sample",
        ),
        (
            {"held_out": 0.95},
            "--held-out: is 0.95, expected a share from 0 to 0.9; pass e.g. --held-out 0.2 (0: no held-out samples)",
        ),
        (
            {"held_out": -0.1},
            "--held-out: is -0.1, expected a share from 0 to 0.9; pass e.g. --held-out 0.2 (0: no held-out samples)",
        ),
        (
            {"held_out": math.nan},
            "--held-out: is nan, expected a share from 0 to 0.9; pass e.g. --held-out 0.2 (0: no held-out samples)",
        ),
        ({"max_length": 0}, "--max-length: is 0, expected at least 1 token; pass e.g. --max-length 512"),
    ],
)
def test_option_errors(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    assert usage_error_of(tmp_path / "missing.txt", **kwargs) == message  # checked before the file is looked at


def test_max_length_below_special_tokens(tmp_path: Path) -> None:
    path = numbered(tmp_path / "c.txt", 3)
    assert usage_error_of(path, ROBERTA, max_length=2) == (
        "--max-length: is 2, but the tokenizer adds 2 special tokens to every sample; raise --max-length above 2"
    )


def test_empty_text_field(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "c.jsonl", ['{"text": "a"}', '{"text": "b"}'])
    assert usage_error_of(path, text_field="") == (
        "--text-field: is empty; pass the key that holds the text in each JSON line"
    )


# -- path errors --------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.txt"
    assert error_of(path) == f"{path}: not found; check the path given to --calibration"


def test_fifo_is_refused_at_once(tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    fifo = tmp_path / "calib.txt"
    os.mkfifo(fifo)
    result: list[str] = []

    def attempt() -> None:
        try:
            read(fifo)
        except InputFileError as exc:
            result.append(str(exc))

    start = time.monotonic()
    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=5)
    assert not thread.is_alive(), "reading a FIFO blocked"
    assert time.monotonic() - start < 5
    assert result == [
        f"{fifo}: is not a regular file or folder (a FIFO); "
        "give a file or a folder of calibration data (save a stream to a file first)"
    ]


def test_fifo_in_an_image_folder_is_skipped(tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    folder = tmp_path / "images"
    folder.mkdir()
    make_png(folder / "a.png")
    make_png(folder / "b.png")
    os.mkfifo(folder / "c.png")
    assert len(all_samples(read(folder, VIT))) == 2


def test_file_name_control_characters_are_escaped(tmp_path: Path) -> None:
    path = tmp_path / "bad\nname\x1b.txt"
    path.write_text("only one line\n")
    message = error_of(path)
    assert message == (
        f"{tmp_path}/bad\\nname\\x1b.txt: holds 1 usable sample; needs at least 2 samples: one to fit, "
        "one to report on; add more lines"
    )


# -- text errors --------------------------------------------------------------------------------------------------


def test_too_few_samples(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "c.txt", ["", "just one", "   "])
    assert error_of(path) == (
        f"{path}: holds 1 usable sample; needs at least 2 samples: one to fit, one to report on; add more lines"
    )
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert error_of(empty) == (
        f"{empty}: holds 0 usable samples; needs at least 2 samples: one to fit, one to report on; add more lines"
    )


def test_line_over_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "MAX_LINE_CHARS", 50)
    path = write_lines(tmp_path / "c.txt", ["fine", "é" * 50, "x" * 51])
    assert error_of(path) == (
        f"{path}, line 3: is longer than 50 characters; "
        "split it into shorter samples (each sample is cut to --max-length tokens anyway)"
    )


def test_line_over_the_byte_bound_is_refused_without_reading_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(calibration, "MAX_LINE_CHARS", 10)
    path = tmp_path / "c.txt"
    path.write_bytes(b"ok\n" + b"y" * 10_000)  # no newline at all after line 1
    assert error_of(path) == (
        f"{path}, line 2: is longer than 10 characters; "
        "split it into shorter samples (each sample is cut to --max-length tokens anyway)"
    )


def test_real_line_limit_refuses_a_huge_line(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"ok\n" + b"z" * (calibration.MAX_LINE_CHARS + 1) + b"\n")
    assert error_of(path).startswith(f"{path}, line 2: is longer than 1,000,000 characters; ")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"fine\nbad \xff byte\n")
    assert error_of(path) == (
        f"{path}, line 2: is not UTF-8 text (byte 0xff at byte 5 of the line); "
        "save the file as UTF-8 (or give a .safetensors file of input_ids)"
    )


JSON_FIX = 'write one JSON object per line, e.g. {"text": "..."}'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", f"is not valid JSON (Expecting property name enclosed in double quotes at column 2); {JSON_FIX}"),
        ('["a list"]', f"is a JSON array, expected an object; {JSON_FIX}"),
        ('"a string"', f"is a JSON string, expected an object; {JSON_FIX}"),
        (
            '{"prompt": "x", "id": 1}',
            "has no 'text' field (its keys: 'prompt', 'id'); pass --text-field with the key that holds the text",
        ),
        ("{}", "has no 'text' field (its keys: none); pass --text-field with the key that holds the text"),
        (
            '{"text": 12}',
            "field 'text' is a JSON number, expected a string; "
            "pass --text-field with the key that holds the text, or store the text as a string",
        ),
        (
            '{"text": null}',
            "field 'text' is a JSON null, expected a string; "
            "pass --text-field with the key that holds the text, or store the text as a string",
        ),
        (
            '{"text": ["a"]}',
            "field 'text' is a JSON array, expected a string; "
            "pass --text-field with the key that holds the text, or store the text as a string",
        ),
    ],
)
def test_jsonl_errors(tmp_path: Path, line: str, message: str) -> None:
    path = write_lines(tmp_path / "c.jsonl", ['{"text": "good"}', "", line, '{"text": "good"}'])
    assert error_of(path) == f"{path}, line 3: {message}"


def test_json_suffix_hint(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=None))
    assert error_of(path) == (
        f"{path}, line 1: is a JSON array, expected an object; {JSON_FIX} (a .json file is read as JSON lines)"
    )


def test_json_keys_with_control_characters_are_escaped(tmp_path: Path) -> None:
    key = "\x1b[31mred" + "k" * 100
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({key: "x"}), json.dumps({key: "y"})])
    message = error_of(path, text_field="te\x07xt")
    shown = "'\\x1b[31mred" + "k" * 15 + "..."  # repr-escaped, cut to 30 characters
    assert message == (
        f"{path}, line 1: has no 'te\\x07xt' field (its keys: {shown}); "
        "pass --text-field with the key that holds the text"
    )


def test_jsonl_deep_nesting(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "c.jsonl", ["[" * 100_000 + "]" * 100_000, '{"text": "x"}'])
    assert error_of(path).startswith(f"{path}, line 1: is not valid JSON (")


# -- model folder errors ------------------------------------------------------------------------------------------


def test_no_tokenizer(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(LLAMA / "config.json", model)
    path = numbered(tmp_path / "c.txt", 3)
    assert read_calibration_error(path, model) == (
        f"{model}: has no tokenizer files (tokenizer.json, tokenizer_config.json, ...); "
        "copy the tokenizer files of the model into it, or give a safetensors file of input_ids"
    )


def test_broken_tokenizer(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(LLAMA / "config.json", model)
    (model / "tokenizer.json").write_text("{not json")
    message = read_calibration_error(numbered(tmp_path / "c.txt", 3), model)
    assert message.startswith(f"{model}: its tokenizer cannot be loaded (")
    assert message.endswith("; copy the tokenizer files of the model into it, or give a safetensors file of input_ids")


def test_text_for_an_image_model(tmp_path: Path) -> None:
    path = numbered(tmp_path / "c.txt", 3)
    assert error_of(path, VIT) == (
        f"{path}: is read as text, but the model in {VIT} takes images (it has preprocessor_config.json, "
        "no tokenizer); give a folder of images or a .safetensors file of pixel_values"
    )


def read_calibration_error(path: Path, model: Path) -> str:
    with pytest.raises(InputFileError) as info:
        read_calibration(path, model, config_of(LLAMA))
    return str(info.value)


# -- image errors -------------------------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        make_png(folder / f"{i}.png", (6 + i, 5), (i * 40, 0, 0))
    return folder


def test_corrupt_image(images: Path) -> None:
    (images / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    message = error_of(images, VIT, held_out=0)
    assert message.startswith(f"{images / '1.png'}: cannot be read as an image (")
    assert message.endswith("; replace or remove the file")


def test_truncated_image(images: Path) -> None:
    data = (images / "2.png").read_bytes()
    (images / "2.png").write_bytes(data[: len(data) // 2])
    message = error_of(images, VIT, held_out=0)
    assert message.startswith(f"{images / '2.png'}: cannot be read as an image (")


def test_no_images(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "readme.md").write_text("x")
    make_png(folder / ".hidden.png")
    assert error_of(folder, VIT) == (
        f"{folder}: holds no images (.bmp, .gif, .jpeg, .jpg, .png, .webp); 1 other file; "
        "put the calibration images in it, or give a text, .jsonl or .safetensors file"
    )


def test_one_image(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    make_png(folder / "a.png")
    assert error_of(folder, VIT) == (
        f"{folder}: holds 1 usable sample; needs at least 2 samples: one to fit, one to report on; add more images"
    )


def test_no_preprocessor_config(tmp_path: Path, images: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(VIT / "config.json", model)
    with pytest.raises(InputFileError) as info:
        read_calibration(images, model, config_of(VIT))
    assert str(info.value) == (
        f"{model}: has no preprocessor_config.json, needed to prepare images; "
        "copy the model's preprocessor_config.json into it, or give a .safetensors file of pixel_values"
    )


def test_folder_for_a_text_model(images: Path) -> None:
    assert error_of(images, LLAMA) == (
        f"{images}: is a folder (read as images), but the model in {LLAMA} takes text; "
        "give a .txt or .jsonl file of text, or a .safetensors file of input_ids"
    )


# -- safetensors errors -------------------------------------------------------------------------------------------


def tensors_error(tmp_path: Path, tensors: dict[str, torch.Tensor], model: Path = LLAMA, **kwargs: Any) -> str:
    path = tmp_path / "t.safetensors"
    save_file({k: v.clone() for k, v in tensors.items()}, str(path))
    return error_of(path, model, **kwargs).removeprefix(f"{path}: ")


GOOD_IDS = torch.arange(12).reshape(3, 4)

TENSOR_CASES: list[tuple[dict[str, torch.Tensor], str]] = [
    (
        {"input_ids": GOOD_IDS, "labels": GOOD_IDS, "\x1bx": GOOD_IDS},
        "holds tensors calibration does not use: '\\x1bx', 'labels'; "
        "keep only input_ids (with attention_mask, token_type_ids) or pixel_values",
    ),
    (
        {"input_ids": GOOD_IDS, "pixel_values": torch.zeros(3, 3, 2, 2)},
        "holds both input_ids and pixel_values; keep one kind of input per file",
    ),
    (
        {"attention_mask": GOOD_IDS},
        "holds no input_ids or pixel_values tensor (found: attention_mask); "
        "save input_ids (samples x tokens) or pixel_values (samples x channels x height x width)",
    ),
    ({"input_ids": GOOD_IDS.float()}, "input_ids has dtype F32, expected an integer dtype; save it as int64"),
    (
        {"input_ids": torch.arange(4)},
        "input_ids has shape [4], expected (samples, tokens); "
        "save one sample per row (pad rows to one length and mark padding in attention_mask)",
    ),
    (
        {"input_ids": torch.zeros(3, 0, dtype=torch.int64)},
        "input_ids has shape [3, 0], expected (samples, tokens); "
        "save one sample per row (pad rows to one length and mark padding in attention_mask)",
    ),
    (
        {"input_ids": torch.zeros(3, 9, dtype=torch.int64)},
        "input_ids rows are 9 tokens long: too long for --max-length 8; "
        "re-make the file with sequences of at most 8 tokens, or raise --max-length to 9",
    ),
    (
        {"input_ids": GOOD_IDS, "attention_mask": torch.ones(3, 5, dtype=torch.int64)},
        "attention_mask has shape [3, 5], but input_ids has [3, 4]; "
        "save one attention_mask row per input_ids row, of the same length",
    ),
    (
        {"input_ids": GOOD_IDS, "attention_mask": torch.ones(3, 4)},
        "attention_mask has dtype F32, expected an integer dtype; save it as int64",
    ),
    (
        {"input_ids": GOOD_IDS, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 2, 0, 0], [1, 0, 0, 0]])},
        "attention_mask holds 2 at row 1, column 1, expected only 0 and 1; mark tokens with 1 and padding with 0",
    ),
    (
        {"input_ids": GOOD_IDS, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])},
        "attention_mask row 2 is all 0 (a sample without tokens); remove the row or mark its tokens with 1",
    ),
    ({"input_ids": GOOD_IDS - 5}, "input_ids holds negative ids (first at row 0, column 0: -5); re-tokenise"),
    (
        {"input_ids": GOOD_IDS + 250},
        "input_ids holds id 256 at row 1, column 2, but the model's vocab_size is 256; "
        "tokenise with the model's own tokenizer",
    ),
    (
        {"input_ids": torch.full((3, 4), 2**63 - 1, dtype=torch.int64)},
        "input_ids holds id 9223372036854775807 at row 0, column 0, but the model's vocab_size is 256; "
        "tokenise with the model's own tokenizer",
    ),
    (
        {"input_ids": torch.tensor([[2**64 - 1] * 4] * 3, dtype=torch.uint64)},
        "input_ids holds id 18446744073709551615 at row 0, column 0, too large for any vocabulary; "
        "tokenise with the model's own tokenizer",
    ),
    (
        {"input_ids": GOOD_IDS, "token_type_ids": torch.full((3, 4), -1)},
        "token_type_ids holds -1 at row 0, column 0, expected 0 to the type_vocab_size; "
        "re-tokenise with the model's own tokenizer",
    ),
    (
        {"input_ids": GOOD_IDS[:1]},
        "holds 1 usable sample; needs at least 2 samples: one to fit, one to report on; add more rows",
    ),
    (
        {"pixel_values": torch.zeros(3, 3, 4, 4)},
        f"holds pixel_values, but the model in {LLAMA} takes text; give input_ids or text",
    ),
]


@pytest.mark.parametrize(("tensors", "message"), TENSOR_CASES)
def test_safetensors_errors(tmp_path: Path, tensors: dict[str, torch.Tensor], message: str) -> None:
    assert tensors_error(tmp_path, tensors, max_length=8) == message


PIXEL_CASES: list[tuple[dict[str, torch.Tensor], str]] = [
    (
        {"pixel_values": torch.zeros(3, 3, 4, 4, dtype=torch.uint8)},
        "pixel_values has dtype U8, expected a float dtype; save it as float32",
    ),
    (
        {"pixel_values": torch.zeros(3, 4, 4)},
        "pixel_values has shape [3, 4, 4], expected (samples, channels, height, width); "
        "save one image per row, as the image processor gives them",
    ),
    (
        {"pixel_values": torch.zeros(3, 1, 4, 4)},
        "pixel_values has 1 channels, but the model takes 3 (config.json num_channels); "
        "prepare the images with the model's image processor",
    ),
    (
        {"pixel_values": torch.zeros(3, 3, 4, 4).index_put_((torch.tensor(2),), torch.tensor(math.inf))},
        "pixel_values holds non-finite values (first in row 2); re-make the file",
    ),
    (
        {"pixel_values": torch.zeros(3, 3, 4, 4), "attention_mask": torch.ones(3, 4, dtype=torch.int64)},
        "holds attention_mask beside pixel_values; keep only pixel_values for an image model",
    ),
    (
        {"input_ids": GOOD_IDS},
        f"holds input_ids, but the model in {VIT} takes images; give pixel_values or a folder of images",
    ),
]


@pytest.mark.parametrize(("tensors", "message"), PIXEL_CASES)
def test_safetensors_pixel_errors(tmp_path: Path, tensors: dict[str, torch.Tensor], message: str) -> None:
    assert tensors_error(tmp_path, tensors, VIT) == message


@pytest.mark.parametrize(
    ("damage", "detail"),
    [
        (lambda data: data[:-7], "incomplete metadata, file not fully covered"),
        (lambda data: b"hello, not a safetensors file", "header too large"),
        (lambda data: b"", "header too small"),
    ],
)
def test_unreadable_safetensors(tmp_path: Path, damage: Callable[[bytes], bytes], detail: str) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"input_ids": GOOD_IDS}, str(path))
    path.write_bytes(damage(path.read_bytes()))
    assert error_of(path) == (
        f"{path}: is not a readable safetensors file (Error while deserializing header: {detail}); "
        "re-save it with safetensors.torch.save_file"
    )


def test_safetensors_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "MAX_TENSOR_BYTES", 1024)
    path = tmp_path / "t.safetensors"
    save_file({"input_ids": torch.zeros(100, 2, dtype=torch.int64)}, str(path))  # 1600 bytes
    read_torch = calibration_tensors._load_tensors
    monkeypatch.setattr(calibration_tensors, "_load_tensors", lambda *a: pytest.fail("tensors read"))  # refused before
    assert error_of(path) == (
        f"{path}: holds 1.56 KiB of tensors, more than the 1 KiB limit; use fewer samples (a few hundred are enough)"
    )
    monkeypatch.setattr(calibration_tensors, "_load_tensors", read_torch)


def test_safetensors_row_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "MAX_SAMPLES", 4)
    path = tmp_path / "t.safetensors"
    save_file({"input_ids": torch.arange(10).reshape(10, 1)}, str(path))
    data = read(path, held_out=0)
    assert [ids(s) for s in data.train] == [[0], [1], [2], [3]]
    assert data.notes[0] == "the file holds 10 samples; used the first 4, the rest was not read"
