import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kimbho import RandomWindowSampler, TokenDataset, Tokenizer, TokenStream, prepare
from kimbho.data.corpus import SECTION_BYTES
from kimbho.errors import KimbhoError

PROSE = "The quick brown fox jumps over the lazy dog. " * 40


def _corpus(root: Path) -> Path:
    """A small folder of documents in several forms."""
    (root / "sub" / "deeper").mkdir(parents=True)
    for i in range(12):
        (root / f"doc{i}.txt").write_text(f"Document {i}. {PROSE}\n")
    (root / "sub" / "deeper" / "nested.md").write_text("Nested text. " + PROSE)
    (root / ".hidden").write_text("hidden files are skipped")
    return root


def test_prepare_folder_layout_and_meta(tmp_path: Path, tokenizer: Tokenizer) -> None:
    src = _corpus(tmp_path / "src")
    meta = prepare([str(src)], tmp_path / "out", tokenizer=tokenizer, val_fraction=0.25)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "tokenizer.json",
        "train-00000.npy",
        "val-00000.npy",
    ]
    assert json.loads((out / "meta.json").read_text()) == meta
    assert (
        meta["tokenizer_sha256"] == tokenizer.sha256
        and meta["vocab_size"] == 512
        and meta["dtype"] == "uint16"
    )
    assert meta["report"]["files"] == 13 and meta["report"]["documents"] == 13
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["documents"] + val["documents"] == 13
    assert val["documents"] == 3  # every 4th document
    shard = np.load(out / "train-00000.npy")
    assert shard.dtype == np.uint16 and len(shard) == train["tokens"]
    assert (shard == tokenizer.eot_id).sum() == train["documents"]  # one separator per document
    text = tokenizer.decode(shard[: list(shard).index(tokenizer.eot_id)].tolist())
    assert text.startswith("Document 0.")


def test_globs_jsonl_and_bad_lines(tmp_path: Path, tokenizer: Tokenizer, caplog) -> None:
    src = _corpus(tmp_path / "src")
    lines = [json.dumps({"text": f"record {i} {PROSE}"}) for i in range(6)]
    lines += [json.dumps({"body": "no text field"}), "{not json", json.dumps({"text": 5}), ""]
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    meta = prepare(
        [str(src / "doc1*.txt"), str(tmp_path / "records.jsonl")], tmp_path / "out", tokenizer=tokenizer
    )
    report = meta["report"]
    assert report["files"] == 4  # doc1, doc10, doc11 and the jsonl file
    assert report["documents"] == 3 + 6
    assert report["jsonl_missing_field"] == 2 and report["jsonl_invalid_lines"] == 1
    assert "without a string 'text' field" in caplog.text


def test_binary_files_are_skipped_and_invalid_utf8_is_counted(
    tmp_path: Path, tokenizer: Tokenizer, caplog
) -> None:
    src = _corpus(tmp_path / "src")
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (src / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 20)
    meta = prepare([str(src)], tmp_path / "out", tokenizer=tokenizer)
    assert [Path(p).name for p in meta["report"]["skipped_binary"]] == ["image.png"]
    assert [Path(p).name for p in meta["report"]["invalid_utf8_files"]] == ["latin1.txt"]
    assert meta["report"]["replaced_bytes"] == 40
    assert "binary" in caplog.text and "invalid UTF-8" in caplog.text


def test_large_single_file_is_split_in_sections(tmp_path: Path, tokenizer: Tokenizer) -> None:
    big = tmp_path / "big.txt"
    line = "a line of a long book, with words in it.\n"
    big.write_text(line * (20 * SECTION_BYTES // len(line)))
    meta = prepare([str(big)], tmp_path / "out", tokenizer=tokenizer, val_fraction=0.1, shard_tokens=5000)
    assert (
        meta["splits"]["val"]["tokens"] > 0
        and meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 1
    )
    assert len(meta["splits"]["train"]["shards"]) > 1  # small shard buffer: several shards
    stream = TokenStream(tmp_path / "out", "train")
    assert len(stream) == meta["splits"]["train"]["tokens"]
    joined = np.concatenate([np.load(tmp_path / "out" / s) for s in meta["splits"]["train"]["shards"]])
    assert np.array_equal(stream.window(4990, 30), joined[4990:5020])  # across a shard boundary


@pytest.mark.parametrize(
    "inputs, message",
    [(["/no/such/path"], "does not exist"), (["/no/such/*.txt"], "does not exist")],
)
def test_missing_inputs(tmp_path: Path, tokenizer: Tokenizer, inputs: list[str], message: str) -> None:
    with pytest.raises(KimbhoError, match=message):
        prepare(inputs, tmp_path / "out", tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()


def test_empty_corpus_leaves_nothing_behind(tmp_path: Path, tokenizer: Tokenizer) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(KimbhoError, match="corpus is empty"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "out", tokenizer=tokenizer)
    with pytest.raises(KimbhoError, match="empty corpus"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "out", vocab_size=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


def test_too_small_for_validation(tmp_path: Path, tokenizer: Tokenizer) -> None:
    (tmp_path / "one.txt").write_text("just one small document")
    with pytest.raises(KimbhoError, match="--val-fraction 0"):
        prepare([str(tmp_path / "one.txt")], tmp_path / "out", tokenizer=tokenizer)
    meta = prepare([str(tmp_path / "one.txt")], tmp_path / "out", tokenizer=tokenizer, val_fraction=0)
    assert meta["splits"]["val"]["tokens"] == 0


def test_existing_output_is_refused_unless_forced(tmp_path: Path, tokenizer: Tokenizer) -> None:
    src = _corpus(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user file")
    with pytest.raises(KimbhoError, match="not empty"):
        prepare([str(src)], tmp_path / "out", tokenizer=tokenizer)
    assert (tmp_path / "out" / "keep.txt").exists()
    prepare([str(src)], tmp_path / "out", tokenizer=tokenizer, force=True)
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_needs_exactly_one_of_tokenizer_and_vocab_size(tmp_path: Path, tokenizer: Tokenizer) -> None:
    with pytest.raises(KimbhoError, match="either a tokenizer"):
        prepare(None, tmp_path / "out")
    with pytest.raises(KimbhoError, match="either a tokenizer"):
        prepare(None, tmp_path / "out", tokenizer=tokenizer, vocab_size=300)


def test_seed_dataloader_pairs_are_shifted_by_one(data_dir: Path) -> None:
    dataset = TokenDataset(data_dir, seq_len=32)
    loader = DataLoader(dataset, batch_size=32, shuffle=True, drop_last=True)
    input_ids, target_ids = next(iter(loader))
    assert input_ids.shape == target_ids.shape == (32, 32) and input_ids.dtype == torch.long
    assert torch.equal(input_ids[:, 1:], target_ids[:, :-1])
    x, y = dataset[3]
    stream = TokenStream(data_dir, "train")
    assert torch.equal(x, torch.from_numpy(stream.window(96, 32).astype(np.int64)))
    assert len(dataset) == (len(stream) - 1) // 32


def test_random_window_sampler_is_a_function_of_seed_and_step(data_dir: Path) -> None:
    stream = TokenStream(data_dir, "train")
    a = RandomWindowSampler(stream, 16, batch_size=4, seed=1)
    b = RandomWindowSampler(stream, 16, batch_size=4, seed=1)
    assert torch.equal(a.batch(7).inputs, b.batch(7).inputs)
    assert not torch.equal(a.batch(7).inputs, a.batch(8).inputs)
    x, y = a.batch(7).inputs, a.batch(7).targets
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(a.batch(7, slice(2, 4)).inputs, x[2:4])  # a process's share of the global batch


def test_not_a_data_directory(tmp_path: Path) -> None:
    with pytest.raises(KimbhoError, match="no meta.json"):
        TokenStream(tmp_path)
    with pytest.raises(KimbhoError, match="does not exist"):
        TokenStream(tmp_path / "missing")


def test_corrupt_shards_are_refused_before_training(data_dir: Path, tmp_path: Path) -> None:
    """Ids past the vocabulary (an IndexError at the first step before) and bit flips that keep
    ids in range (trained on silently before) are refused, naming the shard or the split, before
    the run directory exists; train.verify_data=false skips the check."""
    import shutil

    import kimbho
    from tests.conftest import tiny_run_config

    for damage, message in (
        ("out of range", "holds token id 9999, outside"),
        ("in range", "do not match the SHA-256"),
    ):
        data = tmp_path / damage.replace(" ", "-")
        shutil.copytree(data_dir, data)
        shard = data / "train-00000.npy"
        ids = np.load(shard)
        ids[100] = 9999 if damage == "out of range" else (int(ids[100]) + 1) % 512
        np.save(shard, ids)
        out = tmp_path / f"run-{data.name}"
        with pytest.raises(KimbhoError, match=message) as error:
            kimbho.Trainer(tiny_run_config(), data, out, progress_bar=False)
        assert str(shard) in str(error.value) or "train shards" in str(error.value)
        assert not out.exists()
    trainer = kimbho.Trainer(
        tiny_run_config(verify_data="false", max_steps=2),
        tmp_path / "in-range",
        tmp_path / "anyway",
        progress_bar=False,
    )
    assert trainer.fit()["train"]["loss"] > 0
