import math
from pathlib import Path

import pytest

import kimbho
from kimbho.errors import KimbhoError
from kimbho.evaluation import unigram_bpb
from tests.conftest import run_cli


def test_eval_on_data_directory(trained_run: Path, data_dir: Path, tokenizer: kimbho.Tokenizer) -> None:
    model, tok = kimbho.load(trained_run)
    result = kimbho.evaluate(model, tok, data_dir)
    assert set(result) == {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"}
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    val = kimbho.TokenStream(data_dir, "val")
    assert result["tokens"] == len(val) - 1
    # Bits per byte over the exact bytes of the predicted tokens (every one after the first), as
    # for a text file: not an average bytes-per-token of the split.
    predicted = val.window(1, len(val) - 1)
    assert result["bytes"] == len(tokenizer.decode(predicted.tolist(), skip_special_tokens=True).encode())
    assert result["bits_per_byte"] == pytest.approx(
        result["loss"] * result["tokens"] / math.log(2) / result["bytes"]
    )
    limited = kimbho.evaluate(model, tok, data_dir, max_tokens=100)
    assert limited["bytes"] == len(
        tokenizer.decode(val.window(1, 100).tolist(), skip_special_tokens=True).encode()
    )
    # A trained model beats the unigram baseline on held-out text.
    assert result["bits_per_byte"] < unigram_bpb(data_dir)


def test_count_bytes_counts_no_special_tokens(tokenizer: kimbho.Tokenizer) -> None:
    text = "naïve café, 日本語 😀"
    ids = tokenizer.encode(text)
    assert tokenizer.count_bytes(ids) == len(text.encode())
    assert tokenizer.count_bytes([tokenizer.eot_id, *ids, tokenizer.eot_id]) == len(text.encode())


def test_nothing_to_evaluate_is_an_error_not_a_perfect_score(
    trained_run: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    model, tok = kimbho.load(trained_run)
    with pytest.raises(KimbhoError, match="max_tokens must be at least 1"):
        kimbho.evaluate(model, tok, data_dir, max_tokens=0)
    assert run_cli("eval", trained_run, "--data", data_dir, "--max-tokens", 0) == 1
    assert "max_tokens must be at least 1" in capsys.readouterr().err
    # A data directory without a validation split is refused, not quietly scored on its train split.
    no_val = tmp_path / "no-val"
    kimbho.prepare(None, no_val, tokenizer=data_dir / "tokenizer.json", val_fraction=0.0)
    with pytest.raises(KimbhoError, match="has no validation split"):
        kimbho.evaluate(model, tok, no_val)


def test_eval_on_text_file_counts_bytes(trained_run: Path, tmp_path: Path) -> None:
    model, tok = kimbho.load(trained_run)
    text = "The assert statement is a convenient way to insert debugging assertions into a program. " * 5
    (tmp_path / "held_out.txt").write_text(text)
    result = kimbho.evaluate(model, tok, tmp_path / "held_out.txt")
    ids = tok.encode(text)
    assert result["tokens"] == len(ids) - 1
    predicted_bytes = len(tok.decode(ids[1:]).encode())
    assert result["bits_per_byte"] == pytest.approx(
        result["loss"] * result["tokens"] / math.log(2) / predicted_bytes
    )
    limited = kimbho.evaluate(model, tok, tmp_path / "held_out.txt", max_tokens=10)
    assert limited["tokens"] == 10


def test_eval_bad_inputs(trained_run: Path, tmp_path: Path) -> None:
    model, tok = kimbho.load(trained_run)
    with pytest.raises(KimbhoError, match="does not exist"):
        kimbho.evaluate(model, tok, tmp_path / "missing.txt")
    (tmp_path / "tiny.txt").write_text("a")
    with pytest.raises(KimbhoError, match="too little text"):
        kimbho.evaluate(model, tok, tmp_path / "tiny.txt")
    other = tmp_path / "other"
    kimbho.prepare(None, other, vocab_size=300)
    with pytest.raises(KimbhoError, match="different tokenizer"):
        kimbho.evaluate(model, tok, other)
