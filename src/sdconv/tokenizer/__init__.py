"""CLIP's tokenizer, built in: the token ids of OpenAI's `clip.tokenize` and open_clip's tokenizer.

    from sdconv import tokenize
    ids = tokenize(["a photo of a cat"])            # LongTensor [1, 77]: 49406, ..., 49407, 0, 0, ...

The vocabulary is package data beside this file (bpe_simple_vocab_16e6.txt.gz, from OpenAI CLIP,
MIT; its origin and license are in NOTICE). The steps are OpenAI's clip/simple_tokenizer.py:
ftfy's `fix_text`, HTML unescaped twice, whitespace runs made one space, lower-cased, split by
CLIP's `regex` pattern, each piece's UTF-8 bytes BPE-merged. ftfy and regex are the libraries
both OpenAI clip and open_clip call, so the clean-up and split are theirs exactly; they (and
torch, for `tokenize`'s tensor) are imported on first use, never by `import sdconv`.

Two flavours differ only where the two libraries do: "openai" (clip.tokenize) reads
`<|startoftext|>` / `<|endoftext|>` in a prompt as the special tokens and makes runs of `regex`'s
`\\s` one space; "open_clip" reads `<start_of_text>` / `<end_of_text>` and splits on what
`str.split()` does (which also takes U+001C..U+001F as whitespace, though ftfy has removed them
by then). The ids are the same numbers (49406 start, 49407 end) in both.
"""
from __future__ import annotations

import gzip
import html
from functools import lru_cache
from importlib import resources

from ..errors import UsageError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
MERGES = VOCAB_SIZE - 256 * 2 - 2       # the merges CLIP's vocabulary takes, from the file's second line on
SOT, EOT = 49406, 49407                 # start and end of text
CONTEXT = 77                            # CLIP's context length
PADS = ("zero", "eot")                  # 0 (OpenAI clip, open_clip), or end-of-text (transformers' CLIP tokenizers)
FLAVORS = {
    "openai": ("<|startoftext|>", "<|endoftext|>"),
    "open_clip": ("<start_of_text>", "<end_of_text>"),
}
SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def vocab_bytes() -> bytes:
    """The BPE merges file as shipped (gzip-compressed), read from the installed package."""
    return resources.files(__name__).joinpath(VOCAB_FILE).read_bytes()


def byte_symbols() -> dict:
    """CLIP's byte -> symbol table (GPT-2's): printable bytes stand for themselves, the others
    for code points from 256 on. Its order (printable bytes first) is the vocabulary's order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=None)
def vocabulary(flavor: str = "openai") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the pieces, in id order; the merges, each "first second", in rank order): CLIP's
    vocabulary as OpenAI's simple_tokenizer builds it. Needs neither ftfy nor regex."""
    merges = tuple(gzip.decompress(vocab_bytes()).decode("utf-8").split("\n")[1:MERGES + 1])
    symbols = list(byte_symbols().values())
    pieces = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + list(FLAVORS[flavor])
    return tuple(pieces), merges


def _deps():
    try:
        import ftfy
        import regex
    except ImportError as e:            # declared dependencies: only a broken install lacks them
        raise UsageError(f"the built-in CLIP tokenizer needs the {e.name} package", "pip install ftfy regex")
    return ftfy, regex


class Tokenizer:
    """CLIP's BPE tokenizer (49408 ids). `encode(text)` gives the ids of a text alone;
    calling it gives padded rows of start, ids, end, as `clip.tokenize` does."""

    def __init__(self, flavor: str = "openai"):
        if flavor not in FLAVORS:
            raise UsageError(f"unknown tokenizer flavor {flavor!r}", f"one of: {', '.join(FLAVORS)}")
        ftfy, regex = _deps()
        self.flavor = flavor
        self._ftfy, self._regex = ftfy, regex
        vocab, merges = vocabulary(flavor)
        pairs = [tuple(m.split()) for m in merges]
        table = byte_symbols()
        self._bytes = [table[b] for b in range(256)]
        self._byte_of = {c: b for b, c in table.items()}
        self._ids = {piece: i for i, piece in enumerate(vocab)}
        self._pieces = vocab
        self._ranks = {p: i for i, p in enumerate(pairs)}
        self._cache = {t: [t] for t in FLAVORS[flavor]}
        special = "|".join(regex.escape(t) for t in FLAVORS[flavor])
        self._split = regex.compile(special + "|" + SPLIT, regex.IGNORECASE)
        self._space = regex.compile(r"\s+")

    def clean(self, text: str) -> str:
        """The text as the tokenizer sees it: ftfy-fixed, unescaped, one space per run, lower-cased."""
        text = html.unescape(html.unescape(self._ftfy.fix_text(text))).strip()
        if self.flavor == "openai":
            text = self._space.sub(" ", text)
        else:
            text = " ".join(text.split())
        return text.strip().lower()

    def _bpe(self, piece: str) -> list:
        done = self._cache.get(piece)
        if done is not None:
            return done
        word = [*piece[:-1], piece[-1] + "</w>"]
        ranks, never = self._ranks, len(self._ranks)
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, never))
            if pair not in ranks:
                break
            first, second = pair
            merged, i = [], 0
            while i < len(word):
                if word[i] == first and i + 1 < len(word) and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[piece] = word
        return word

    def encode(self, text: str) -> list:
        """The ids of `text`, without start, end or padding."""
        if not isinstance(text, str):
            raise UsageError(f"a prompt must be a string, not {type(text).__name__}")
        ids = []
        for piece in self._split.findall(self.clean(text)):
            symbols = "".join(self._bytes[b] for b in piece.encode("utf-8"))
            ids.extend(self._ids[p] for p in self._bpe(symbols))
        return ids

    def decode(self, ids) -> str:
        """Ids back to text (after clean-up; word ends as spaces), as clip's decode does."""
        text = "".join(self._pieces[int(i)] for i in ids)
        return bytearray(self._byte_of[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def rows(self, texts, context_length: int = CONTEXT, *, pad: str = "zero", truncate: bool = True) -> list:
        """Each text as `context_length` ids: start, the text's ids, end, then padding. A text too
        long is cut with its last id made end-of-text (`truncate`), or refused."""
        if isinstance(texts, str):
            texts = [texts]
        if pad not in PADS:
            raise UsageError(f"unknown padding {pad!r}", f"one of: {', '.join(PADS)}")
        if not isinstance(context_length, int) or context_length < 2:
            raise UsageError(f"context_length must be an integer of at least 2, not {context_length!r}")
        filler = 0 if pad == "zero" else EOT
        out = []
        for text in texts:
            ids = [SOT, *self.encode(text), EOT]
            if len(ids) > context_length:
                if not truncate:
                    raise UsageError(f"prompt too long for context length {context_length} ({len(ids)} tokens): "
                                     f"{text[:60]!r}", "pass truncate=True to cut it (end-of-text is kept)")
                ids = ids[:context_length - 1] + [EOT]
            out.append(ids + [filler] * (context_length - len(ids)))
        return out

    def __call__(self, texts, context_length: int = CONTEXT, *, pad: str = "zero", truncate: bool = True):
        """`rows()` as a torch LongTensor [len(texts), context_length]."""
        import torch
        rows = self.rows(texts, context_length, pad=pad, truncate=truncate)
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), context_length)


@lru_cache(maxsize=None)
def get_tokenizer(flavor: str = "openai") -> Tokenizer:
    """One shared `Tokenizer` per flavor (the vocabulary is read once)."""
    return Tokenizer(flavor)


def tokenize(texts, context_length: int = CONTEXT, *, pad: str = "zero", truncate: bool = True,
             flavor: str = "openai"):
    """Prompts to a LongTensor [n, context_length] of CLIP token ids, as `clip.tokenize(texts,
    context_length, truncate=True)` and open_clip's tokenizer give them: start (49406), the ids,
    end (49407), then `pad` "zero" (0: OpenAI clip, open_clip) or "eot" (49407: transformers'
    CLIPTokenizer with SD1's or openai/clip-vit-large-patch14's pad token). Too long: cut, the last
    id made end-of-text; with `truncate=False`, a UsageError."""
    return get_tokenizer(flavor)(texts, context_length, pad=pad, truncate=truncate)


def encode(text: str, *, flavor: str = "openai") -> list:
    """One prompt's ids, without start, end or padding (`clip`'s `_tokenizer.encode`)."""
    return get_tokenizer(flavor).encode(text)
