"""A torch-free CLIP BPE tokenizer that gives the ids of open_clip's `SimpleTokenizer` (the `tokenize`
function every open_clip CLIP model uses): same cleaning, same regex, same vocabulary file, same
start/end tokens, same truncation (the last kept token becomes <end_of_text>) and zero padding.

Dependencies: `regex` (the `\\p{L}` / `\\p{N}` classes of open_clip's pattern; the standard `re` has no
Unicode property classes, and emulating them would drift with Unicode versions). `ftfy` is optional:
open_clip runs `ftfy.fix_text` first; without ftfy a built-in subset is used (HTML unescape, terminal
escapes, Latin ligatures, full/half width, curly quotes, control characters, NFC), which matches ftfy on
everything but mojibake repair (text that was decoded with the wrong codec).

The vocabulary is `bpe_simple_vocab_16e6.txt.gz` (shipped in the bundle as the manifest's
`tokenizer.file`); `Tokenizer.from_file(path)` loads it once.
"""

from __future__ import annotations

import gzip
import html
import re as _re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedclip.sdk.errors import BundleError, ConfigError

try:
    import regex  # type: ignore[import-untyped]  # the regex package ships no type information
except ImportError:  # pragma: no cover - regex is a dependency; say so instead of a traceback
    regex = None

try:
    import ftfy as _ftfy
except ImportError:
    _ftfy = None  # type: ignore[assignment]  # ftfy is optional: text is then cleaned without it

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_CONTEXT_LENGTH = 77
SOT, EOT = "<start_of_text>", "<end_of_text>"
# open_clip keeps the first 49152 - 256 - 2 merges of the file (line 0 is a version header).
_N_MERGES = 49152 - 256 - 2


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable character map of GPT-2 / CLIP BPE."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


# ---- ftfy fallback (the parts of ftfy.fix_text that apply to well-formed text) ----------------------
_ANSI_RE = _re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_SINGLE_QUOTE_RE = _re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTE_RE = _re.compile("[\u201c-\u201f]")
_CONTROL_CHARS = {
    c: None
    for c in [
        *range(0x00, 0x09),
        0x0B,
        *range(0x0E, 0x20),
        0x7F,
        *range(0x206A, 0x2070),
        0xFEFF,
        *range(0xFFF9, 0xFFFD),
    ]
}
_LIGATURES = {
    0x132: "IJ",
    0x133: "ij",
    0x149: "ʼn",
    0x1F1: "DZ",
    0x1F2: "Dz",
    0x1F3: "dz",
    0x1C4: "DŽ",
    0x1C5: "Dž",
    0x1C6: "dž",
    0x1C7: "LJ",
    0x1C8: "Lj",
    0x1C9: "lj",
    0x1CA: "NJ",
    0x1CB: "Nj",
    0x1CC: "nj",
    0xFB00: "ff",
    0xFB01: "fi",
    0xFB02: "fl",
    0xFB03: "ffi",
    0xFB04: "ffl",
    0xFB05: "ſt",
    0xFB06: "st",
}


@lru_cache
def _width_map() -> dict[int, str]:
    table = {0x3000: " "}
    for i in range(0xFF01, 0xFFF0):
        alt = unicodedata.normalize("NFKC", chr(i))
        if alt != chr(i):
            table[i] = alt
    return table


def _fix_text_fallback(text: str) -> str:
    if "<" not in text:  # ftfy's "auto": leave HTML alone when it looks like markup
        text = html.unescape(text)
    text = _ANSI_RE.sub("", text)
    text = text.translate(_LIGATURES).translate(_width_map())
    text = _SINGLE_QUOTE_RE.sub("'", _DOUBLE_QUOTE_RE.sub('"', text))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.translate(_CONTROL_CHARS)
    return unicodedata.normalize("NFC", text)


def fix_text(text: str, use_ftfy: bool | None = None) -> str:
    """`ftfy.fix_text` when ftfy is installed (or `use_ftfy`), else the built-in subset."""
    if use_ftfy is None:
        use_ftfy = _ftfy is not None
    if use_ftfy:
        if _ftfy is None:
            raise ConfigError("tokenizer: ftfy was requested but is not installed")
        return _ftfy.fix_text(text)
    return _fix_text_fallback(text)


def clean(text: str, use_ftfy: bool | None = None) -> str:
    """open_clip's default 'lower' cleaning: fix_text, double HTML unescape, collapse whitespace, lower."""
    text = html.unescape(html.unescape(fix_text(text, use_ftfy))).strip()
    return " ".join(text.split()).strip().lower()


class Tokenizer:
    """CLIP BPE: `tok(["a photo of a cat."]) -> np.int64 [N, context_length]`."""

    def __init__(
        self,
        merges: Sequence[tuple[str, str]],
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        use_ftfy: bool | None = None,
    ):
        if regex is None:
            raise ConfigError("tokenizer: the 'regex' package is needed (pip install regex)")
        if context_length < 2:
            raise ConfigError(f"tokenizer.context_length: must be >= 2, got {context_length}")
        self.context_length = context_length
        self.use_ftfy = use_ftfy
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.sot_token_id = self.encoder[SOT]
        self.eot_token_id = self.encoder[EOT]
        self.vocab_size = len(self.encoder)
        self._cache: dict[str, str] = {SOT: SOT, EOT: EOT}
        self._pat = regex.compile(
            rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
            regex.IGNORECASE,
        )

    @classmethod
    def from_file(
        cls, path: str | Path, context_length: int = DEFAULT_CONTEXT_LENGTH, use_ftfy: bool | None = None
    ) -> Tokenizer:
        return cls(_load_merges(str(path)), context_length, use_ftfy)

    def bpe(self, token: str) -> str:
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        out = " ".join(word)
        self._cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for token in self._pat.findall(clean(text, self.use_ftfy)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return (
            bytearray(self.byte_decoder[c] for c in text)
            .decode("utf-8", errors="replace")
            .replace("</w>", " ")
        )

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = ids
        return out


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word[:-1], word[1:], strict=True))


@lru_cache(maxsize=4)
def _load_merges(path: str) -> tuple[tuple[str, str], ...]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise BundleError(f"{path}: tokenizer vocabulary not found") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not a gzip BPE vocabulary ({e})") from None
    pairs = [line.split() for line in lines[1 : _N_MERGES + 1]]
    if len(pairs) != _N_MERGES or any(len(m) != 2 for m in pairs):
        raise BundleError(f"{path}: not a CLIP BPE vocabulary (expected {_N_MERGES} merge pairs)")
    return tuple((a, b) for a, b in pairs)


def default_vocab_path() -> Path:
    """The vocabulary shipped next to this module, else open_clip's copy (found without importing it)."""
    here = Path(__file__).with_name(VOCAB_NAME)
    if here.is_file():
        return here
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.origin:
        cand = Path(spec.origin).with_name(VOCAB_NAME)
        if cand.is_file():
            return cand
    raise BundleError(f"{VOCAB_NAME} not found: pass the bundle's tokenizer file")
