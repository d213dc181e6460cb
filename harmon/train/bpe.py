"""A small byte-level BPE tokenizer for the project's own model, trained with ``tokenizers``.

Trained on ShapeWorld's texts (captions of every style, questions, answers) plus Harmon's fixed
prompt strings, it keeps the byte-level fallback (any text encodes) and carries the Qwen chat
special tokens and ``<image>``, so every prompt format of the official model works unchanged.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..tokenizer import (CAPTION_QUESTION, GENERATE_PROMPT, SPECIAL_TOKENS, UNCONDITIONAL_PROMPT,
                         HarmonTokenizer, chat)


def shapeworld_texts(num_scenes: int = 4000, seed: int = 0) -> Iterator[str]:
    """Every text the model will see: chat-formatted prompts, captions, questions and answers."""
    from ..data.shapeworld import ShapeWorld

    world = ShapeWorld(size=64, seed=seed)
    yield chat(UNCONDITIONAL_PROMPT)
    yield chat("<image>\n" + CAPTION_QUESTION)
    for i in range(num_scenes):
        scene = world.sample(i)
        for caption in scene.captions.values():
            yield chat(GENERATE_PROMPT.format(prompt=caption))
            yield caption + "<|im_end|>"
        for qa in scene.questions():
            yield chat("<image>\n" + qa.question) + qa.answer + "<|im_end|>"


def train_bpe(texts: Iterable[str], vocab_size: int = 512) -> HarmonTokenizer:
    """Byte-level BPE with the Harmon special tokens (ids 0..3)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (the byte "
                         f"alphabet and the special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return HarmonTokenizer(tok)


def add_train_tokenizer_command(subparsers) -> None:
    from ..cli import examples

    p = subparsers.add_parser("train-tokenizer", help="train a small BPE tokenizer on ShapeWorld",
                              **examples("harmon train-tokenizer --out runs/tok",
                                         "harmon train-tokenizer --out runs/tok --vocab-size 1024 "
                                         "--scenes 20000"))
    p.add_argument("--out", required=True, help="directory to write tokenizer.json to")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--scenes", type=int, default=4000, help="ShapeWorld scenes to read texts from")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train_tokenizer)


def _cmd_train_tokenizer(args) -> int:
    tok = train_bpe(shapeworld_texts(args.scenes, args.seed), args.vocab_size)
    tok.save(args.out)
    print(f"wrote {args.out}/tokenizer.json ({tok.vocab_size} ids)")
    return 0
