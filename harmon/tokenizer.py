"""Tokenizer and the exact prompt strings of Harmon.

Harmon uses the Qwen2.5 tokenizer plus one added special token, ``<image>``, and the Qwen chat
format without a system prompt and without BOS. :class:`HarmonTokenizer` wraps a ``tokenizers``
tokenizer loaded from a local ``tokenizer.json`` (the official Qwen2.5 one, or the project's own).
:func:`byte_level_tokenizer` builds a tokenizer that needs no file, for randomly initialised models.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

IM_START, IM_END, ENDOFTEXT, IMAGE = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, IMAGE)

CHAT_TEMPLATE = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
GENERATE_PROMPT = "Generate an image: {prompt}"
UNCONDITIONAL_PROMPT = "Generate an image."
UNDERSTAND_PROMPT = "<image>\n{question}"
CAPTION_QUESTION = "Describe the image in detail."
# the question whose answer is a prompt-like caption ("a red circle and a blue star"); what
# Harmon.score asks by default
BRIEF_CAPTION_QUESTION = "Describe the image briefly."


def chat(text: str) -> str:
    """One user turn in the Qwen chat format, ending where the assistant starts."""
    return CHAT_TEMPLATE.format(input=text)


def pad_ids(rows: list[list[int]], pad_id: int, left: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Id rows of different lengths -> ids (B, L) filled with ``pad_id`` and the 0/1 attention
    mask (B, L). Right padding for prompts that are read whole; left padding keeps every row's
    last token at the end, where decoding continues."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        where = slice(L - len(r), L) if left else slice(0, len(r))
        ids[i, where] = torch.tensor(r, dtype=torch.long)
        mask[i, where] = 1
    return ids, mask


class HarmonTokenizer:
    """Text <-> ids, with the ids Harmon needs (``im_end_id``, ``image_id``, ``pad_id``)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        missing = [t for t in (IM_START, IM_END) if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the chat special token(s) {missing}")
        if tokenizer.token_to_id(IMAGE) is None:
            tokenizer.add_special_tokens([AddedToken(IMAGE, special=True, normalized=False)])
        self.im_start_id = tokenizer.token_to_id(IM_START)
        self.im_end_id = tokenizer.token_to_id(IM_END)
        self.image_id = tokenizer.token_to_id(IMAGE)
        self.pad_id = self.im_end_id  # the reference right-pads prompts with <|im_end|>

    @classmethod
    def from_dir(cls, path: str | Path) -> "HarmonTokenizer":
        """Load ``tokenizer.json`` from a local directory (or the file itself)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json at {path}; pass the directory of a Qwen2.5 tokenizer "
                "(it holds tokenizer.json) or of a model saved by harmon")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{file} is not a valid tokenizer.json: {e}") from None
        return cls(tok)

    def save(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(Path(path) / "tokenizer.json"))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- Harmon prompts ------------------------------------------------------------------------

    def generation_ids(self, prompt: str, max_tokens: int | None = 128) -> list[int]:
        """Ids of the conditional generation prompt, the caption cut so the total fits."""
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("empty prompt: describe the image to generate")
        ids = self.encode(chat(GENERATE_PROMPT.format(prompt=prompt)))
        if max_tokens is not None and len(ids) > max_tokens:
            head = self.encode(chat(GENERATE_PROMPT.format(prompt="")).split(IM_END)[0])
            tail = self.encode(IM_END + "\n<|im_start|>assistant\n")
            body = self.encode(prompt)[: max(0, max_tokens - len(head) - len(tail))]
            warnings.warn(f"prompt of {len(ids)} tokens truncated to {max_tokens}: "
                          f"{prompt[:40]!r}...", stacklevel=3)
            ids = head + body + tail
        return ids

    def unconditional_ids(self) -> list[int]:
        return self.encode(chat(UNCONDITIONAL_PROMPT))

    def question_ids(self, question: str, image_length: int) -> list[int]:
        """Ids of an understanding prompt with ``image_length`` image placeholders."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("empty question: ask something about the image")
        text = chat(UNDERSTAND_PROMPT.format(question=question))
        before, after = text.split(IMAGE, 1)
        return self.encode(before) + [self.image_id] * image_length + self.encode(after)


def _bytes_to_unicode() -> dict[int, str]:
    # the byte-level BPE alphabet: printable bytes map to themselves, the rest to 256 + n
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def byte_level_tokenizer() -> HarmonTokenizer:
    """260 ids: the 256 bytes (id = byte value) and the four Harmon special tokens."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return HarmonTokenizer(tok)
