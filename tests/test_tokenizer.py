import pytest

from kimbho import Tokenizer
from kimbho.errors import KimbhoError

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  \n\n\ttabs\r\nwindows newlines",
    "naïve café — “quotes” and ‘apostrophes’",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 👩‍👩‍👧‍👦 🇺🇳 and combining e\u0301",
    "zero width\u200bjoiner and \x00 nul and \x7f del",
    "<|endoftext|> and <|pad|> written in text are just text",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_any_unicode_round_trips(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_token_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.pad_id == 0 and tokenizer.eot_id == 1
    assert tokenizer.token_to_id("<|user|>") is not None


def test_special_strings_in_text_are_not_special(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|endoftext|>")
    assert tokenizer.eot_id not in ids and len(ids) > 1


def test_batch_encoding_matches_single(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode_batch(TEXTS) == [tokenizer.encode(t) for t in TEXTS]


def test_save_and_load_keep_hash(tokenizer: Tokenizer, tmp_path) -> None:
    tokenizer.save(tmp_path / "tok.json")
    again = Tokenizer.from_file(tmp_path / "tok.json")
    assert again.sha256 == tokenizer.sha256 and again.vocab_size == tokenizer.vocab_size == 512


def test_training_errors(tmp_path) -> None:
    with pytest.raises(KimbhoError, match="empty corpus"):
        Tokenizer.train(iter([]), 300)
    with pytest.raises(KimbhoError, match="too small"):
        Tokenizer.train(["some text"], 100)
    with pytest.raises(KimbhoError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(KimbhoError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "bad.json")
