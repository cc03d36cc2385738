"""The torch-free tokenizer gives open_clip's ids, with and without ftfy."""

from __future__ import annotations

import gzip
import subprocess
import sys

import numpy as np
import pytest

from fedclip.sdk.errors import BundleError, ConfigError
from fedclip.sdk.tokenizer import Tokenizer, clean, default_vocab_path, fix_text

CORPUS = [
    "a photo of a cat.",
    "",
    "   ",
    "A PHOTO OF A DOG",
    "Hello, World!!! It's a dog's life; they're here, we'll see, I'd go, you've been, I'm ok.",
    "naïve café — déjà vu “quoted” ‘single’ «guillemets»",
    "ﬁne ﬂour, ＬＯＵＤ　ＮＯＩＳＥＳ, ｶﾀｶﾅ",
    "数字 123 ½ Ⅻ ² x² 3.14159 1,000,000",
    "emoji 🐈‍⬛ 👍🏽 flags 🇩🇪 ❤️",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;",
    "tab\there new\nline\r\nend\u2028sep",
    "\x1b[31mred\x1b[0m and \x00nul\x07bel",
    "Ǆ ǅ ĳ ŉ",
    "السلام عليكم",
    "Привет, мир! Ελληνικά",
    "e\u0301 combining accents vs é",
    "under_score snake_case CamelCase kebab-case #hashtag @user http://example.com/a?b=c",
    "<start_of_text> literal <end_of_text> tokens",
    "zero\u200bwidth and\ufeffbom",
    "a photo of a t-shirt.",
    "ankle boot",
    "x" * 300,
    " ".join(["word"] * 100),
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "!!!???...,,,;;;::: ---___ +++ === ***",
]


@pytest.fixture(scope="module")
def open_clip_tokenize():
    open_clip = pytest.importorskip("open_clip")
    return lambda texts, n: open_clip.tokenize(texts, context_length=n).numpy()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(default_vocab_path())


@pytest.mark.parametrize("context_length", [77, 16])
@pytest.mark.parametrize("use_ftfy", [True, False], ids=["ftfy", "fallback"])
def test_ids_match_open_clip(open_clip_tokenize, context_length, use_ftfy):
    tok = Tokenizer.from_file(default_vocab_path(), context_length=context_length, use_ftfy=use_ftfy)
    expected = open_clip_tokenize(CORPUS, context_length)
    got = tok(CORPUS)
    assert got.dtype == np.int64 and got.shape == (len(CORPUS), context_length)
    mismatched = [text for text, a, b in zip(CORPUS, expected, got, strict=True) if not np.array_equal(a, b)]
    assert not mismatched


def test_single_string_and_per_call_context_length(tok, open_clip_tokenize):
    assert tok("a cat").shape == (1, 77)
    assert np.array_equal(tok("a cat", context_length=5), open_clip_tokenize(["a cat"], 5))


def test_special_tokens_truncation_and_padding(tok):
    empty = tok([""])[0]
    assert empty[0] == tok.sot_token_id and empty[1] == tok.eot_token_id and not empty[2:].any()
    long = tok(["word " * 200], context_length=10)[0]
    assert long[0] == tok.sot_token_id and long[-1] == tok.eot_token_id and (long[1:-1] != 0).all()
    assert tok.vocab_size == 49408


def test_decode_round_trip(tok):
    ids = tok.encode("a photo of a golden retriever, 2 dogs!")
    assert tok.decode(ids).strip() == "a photo of a golden retriever , 2 dogs !"


def test_fallback_cleaning_matches_ftfy_on_corpus():
    pytest.importorskip("ftfy")
    for text in CORPUS:
        assert clean(text, use_ftfy=False) == clean(text, use_ftfy=True), text
    assert fix_text("ﬁne “q”", use_ftfy=False) == 'fine "q"'


def test_bad_vocabulary_files(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        Tokenizer.from_file(tmp_path / "missing.txt.gz")
    (tmp_path / "plain.txt.gz").write_text("not gzip")
    with pytest.raises(BundleError, match="not a gzip"):
        Tokenizer.from_file(tmp_path / "plain.txt.gz")
    (tmp_path / "short.txt.gz").write_bytes(gzip.compress(b"#version\na b\n"))
    with pytest.raises(BundleError, match="merge pairs"):
        Tokenizer.from_file(tmp_path / "short.txt.gz")
    with pytest.raises(ConfigError, match="context_length"):
        Tokenizer.from_file(default_vocab_path(), context_length=1)


def test_tokenizer_does_not_import_torch():
    code = (
        "import sys; from fedclip.sdk.tokenizer import Tokenizer, default_vocab_path; "
        "Tokenizer.from_file(default_vocab_path())(['a cat']); "
        "bad = [m for m in ('torch', 'open_clip') if m in sys.modules]; assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
