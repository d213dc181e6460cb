"""The ``harmon`` command line.

    harmon generate "a red circle to the left of a blue square" -n 4 -o out.png
    harmon ask image.png "How many shapes are there?"
    harmon caption image.png
    harmon info
    harmon serve                      # the web page
    harmon data export / harmon eval shapes / harmon train / harmon train-vae
    harmon reference tests/fixtures/harmon_reference
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

EXAMPLES = """examples:
  harmon generate "a red circle" "two blue squares" -n 2 --seed 0 -o samples/
  harmon generate "a red circle and a blue star" --candidates 4   # best of 4, by the model itself
  harmon generate "a red circle and a blue star" --refine 3       # 3 rounds of self-correction
  harmon generate "three circles" --no-name-colors              # leave the colours to the model
  harmon generate "a green star" --checkpoint /models/harmon_1.5b.pth --size 512 --device cuda
  harmon ask photo.png "What colour is the circle?"
  harmon caption photo.png
  harmon info --checkpoint tiny
"""


def examples(*lines: str) -> dict:
    """``add_parser`` keyword arguments that print ``lines`` as the help's examples section."""
    return {"epilog": "examples:\n" + "\n".join(f"  {x}" for x in lines),
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="model directory, native .pth, or preset (tiny, harmon-0.5b, harmon-1.5b: "
                        "random weights); default: the model shipped with harmon")
    p.add_argument("--vae", default=None, help="kl16.ckpt for a native .pth (default: beside it)")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on "
                                                 "CPU, bf16 on GPU)")


def _load(args):
    from .pipeline import Harmon

    model = Harmon.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype,
                                   vae=args.vae, tokenizer=args.tokenizer)
    if not model.trained:
        print(f"note: {model.name}: outputs are noise until you load trained weights",
              file=sys.stderr)
    return model


def _parse_size(text: str | None) -> int | tuple[int, int] | None:
    """``--size`` as S or HxW."""
    if text is None:
        return None
    parts = str(text).lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--size must be S or HxW in pixels (e.g. 512 or 512x768), got {text!r}")
    return int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))


def _output_paths(out: str, count: int) -> list[Path]:
    """``out`` is a .png/.jpg file (numbered when several images) or a directory."""
    p = Path(out)
    if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
        if count == 1:
            return [p]
        return [p.with_name(f"{p.stem}_{i:03d}{p.suffix}") for i in range(count)]
    return [p / f"{i:05d}.png" for i in range(count)]


def cmd_generate(args) -> int:
    from tqdm import tqdm

    size = _parse_size(args.size)
    total = len(args.prompts) * args.num_images
    paths = _output_paths(args.output, total)
    taken = [str(p) for p in paths if p.exists()]
    if taken and not args.overwrite:
        raise FileExistsError(f"{taken[0]} already exists"
                              + (f" (and {len(taken) - 1} more)" if len(taken) > 1 else "")
                              + "; choose another --output or pass --overwrite")
    model = _load(args)  # after the cheap checks
    bars = []  # made at the first step, once the inputs have been checked

    def progress(info):
        if not bars:
            bars.append(tqdm(total=info.num_steps, desc="generating", unit="step",
                             disable=args.quiet))
        bars[0].update(1)

    t0 = time.perf_counter()
    try:
        images = model.generate(args.prompts, num_images_per_prompt=args.num_images, size=size,
                                steps=args.steps, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                                temperature=args.temperature, seed=args.seed, mode=args.mode,
                                head_steps=args.head_steps, head_sampler=args.head_sampler,
                                head_eta=args.head_eta, compile=args.compile,
                                candidates=args.candidates, rerank=args.rerank,
                                name_colors=args.name_colors, refine=args.refine,
                                refine_fraction=args.refine_fraction,
                                refine_steps=args.refine_steps, on_step=progress)
    finally:
        for bar in bars:
            bar.close()
    given = [p for p in args.prompts for _ in range(args.num_images)]
    for path, image, prompt in zip(paths, images, given):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(path)
        if image.info.get("prompt", prompt) != prompt:
            print(f"{path}: drawn as {image.info['prompt']!r}", file=sys.stderr)
    best = args.candidates or model.sampling["candidates"]
    picked = f", each the best of {best} by its own reading" if best > 1 else ""
    print(f"{total} image(s) in {time.perf_counter() - t0:.1f}s with {model.name}{picked}",
          file=sys.stderr)
    return 0


def cmd_ask(args) -> int:
    model = _load(args)
    print(model.answer(args.image, args.question, max_new_tokens=args.max_new_tokens,
                       size=args.size, instruction="" if args.no_instruction else None)[0])
    return 0


def cmd_caption(args) -> int:
    model = _load(args)
    for image in args.images:
        text = model.caption(image, max_new_tokens=args.max_new_tokens, size=args.size)[0]
        print(f"{image}: {text}" if len(args.images) > 1 else text)
    return 0


def cmd_info(args) -> int:
    import torch

    from .checkpoints import PAPER_SAMPLING

    model = _load(args)
    info = model.info()
    info["torch"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"model       {info['name']}{'' if info['trained'] else '  (random weights)'}")
    if info["provenance"]:
        print(f"weights     {info['provenance']}")
    if info["answer_instruction"]:
        print(f"questions   end with {info['answer_instruction']!r} (harmon ask --no-instruction "
              "leaves it out)")
    print(f"device      {info['device']}  dtype {info['dtype']}  image size {info['image_size']}")
    def settings(d):
        shown = {k: v for k, v in d.items() if k != "rerank" or d.get("candidates", 1) > 1}
        return "  ".join(f"{k} {'on' if v else 'off'}" if isinstance(v, bool)
                         else f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}"
                         for k, v in shown.items())

    paper = ("" if info["sampling"] == PAPER_SAMPLING
             else f"  (the paper's: {settings(PAPER_SAMPLING)})")
    print(f"sampling    {settings(info['sampling'])}{paper}")
    if info["local_conv"]:
        print(f"architecture  with local convolutions of width {info['local_conv']} in the MAR "
              "(mar.local_conv; not Harmon's)")
    for k, v in info["parameters"].items():
        print(f"  {k:<22}{v / 1e6:>10.2f} M")
    print(f"  {'total':<22}{info['total_parameters'] / 1e6:>10.2f} M")
    return 0


def cmd_reference(args) -> int:
    from .reference import main as reference_main

    return reference_main([args.directory] + (["-v"] if args.verbose else []))


def build_parser() -> argparse.ArgumentParser:
    from .generate import REFINE_FRACTION, REFINE_STEPS
    from .understand import SCORE_METHODS

    ap = argparse.ArgumentParser(prog="harmon", description="Harmon: one model to generate images "
                                 "from text and answer questions about images.",
                                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text to image", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("prompts", nargs="+", help="one or more prompts")
    g.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt")
    g.add_argument("--seed", type=int, default=0, help="random seed (same seed, same image)")
    g.add_argument("--candidates", type=int, default=None,
                   help="draw this many images per image kept and keep the one the model itself "
                        "reads as most like the prompt (default: the model's, see harmon info; "
                        "1 keeps the first draw)")
    g.add_argument("--rerank", default=None, choices=SCORE_METHODS,
                   help="how the model compares candidates: yes = p(yes | 'Is there PROMPT in "
                        "the image?'), caption = p(PROMPT | 'Describe the image briefly.'), "
                        "questions = the answers to the questions the prompt asks (how many "
                        "circles, what colour; ShapeWorld prompts) (default: the model's)")
    g.add_argument("--name-colors", action=argparse.BooleanOptionalAction, default=None,
                   help="name a colour for every shape the prompt gives none (\"three circles\" "
                        "is drawn as, e.g., \"three yellow circles\"; ShapeWorld prompts only; "
                        "each completed prompt is printed) (default: the model's, see harmon info)")
    g.add_argument("--refine", type=int, default=0,
                   help="rounds of self-correction after the K steps: re-mask the tokens that "
                        "fit the rest worst and sample them again (default 0)")
    g.add_argument("--refine-fraction", type=float, default=REFINE_FRACTION,
                   help="share of the tokens re-masked per round (default %(default)s)")
    g.add_argument("--refine-steps", type=int, default=REFINE_STEPS,
                   help="steps per round (default %(default)s)")
    g.add_argument("--cfg", type=float, default=None,
                   help="guidance scale (>= 1; default: the model's, see harmon info; 3 for the "
                        "paper's weights)")
    g.add_argument("--cfg-schedule", default="constant", choices=["constant", "linear"])
    g.add_argument("--steps", type=int, default=None,
                   help="masked-generation steps K (default 64, or the token count if smaller)")
    g.add_argument("--temperature", type=float, default=None,
                   help="temperature of the diffusion head's draws (> 0; default: the model's, "
                        "see harmon info; 1 for the paper's weights)")
    g.add_argument("--mode", default="fast", choices=["fast", "reference"],
                   help="fast (default; the reference's tokens up to float rounding) or reference")
    g.add_argument("--compile", action="store_true",
                   help="compile the diffusion head (torch.compile; pays when many images are "
                        "made in one call: the first compilation takes up to a minute on a "
                        "small CPU, later processes reuse torch's on-disk cache)")
    g.add_argument("--head-steps", type=int, default=None,
                   help="diffusion-head steps (default 100; fewer is faster and approximate)")
    g.add_argument("--head-sampler", default="ddpm", choices=["ddpm", "ddim"],
                   help="diffusion-head update: ddpm (the reference) or ddim (approximate, for "
                        "few head steps)")
    g.add_argument("--head-eta", type=float, default=0.0, help="DDIM noise level, 0..1")
    g.add_argument("--size", default=None,
                   help="S or HxW, multiples of the VAE stride (default: the model's size)")
    g.add_argument("-o", "--output", default="harmon.png", help="image file or directory")
    g.add_argument("--overwrite", action="store_true", help="replace existing image files")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)

    a = sub.add_parser("ask", help="answer a question about an image", **examples(
        'harmon ask image.png "How many circles are there?"',
        'harmon ask image.png "What color is the star?" --checkpoint /models/Harmon-1_5B --device cuda'))
    a.add_argument("image")
    a.add_argument("question")
    a.add_argument("--max-new-tokens", type=int, default=256)
    a.add_argument("--size", type=int, default=None, help="input resolution (default: model's)")
    a.add_argument("--no-instruction", action="store_true",
                   help="ask exactly the question given, without the model's answer instruction "
                        "(the shipped model's: LLaVA's short-answer line; see harmon info)")
    _add_model_args(a)
    a.set_defaults(func=cmd_ask)

    c = sub.add_parser("caption", help="describe images", **examples(
        "harmon caption image.png", "harmon caption samples/*.png --max-new-tokens 64"))
    c.add_argument("images", nargs="+")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--size", type=int, default=None)
    _add_model_args(c)
    c.set_defaults(func=cmd_caption)

    i = sub.add_parser("info", help="model, device, dtype and parameter counts", **examples(
        "harmon info", "harmon info --checkpoint harmon-1.5b --json",
        "harmon info --checkpoint /models/harmon_1.5b.pth --dtype bfloat16"))
    i.add_argument("--json", action="store_true")
    _add_model_args(i)
    i.set_defaults(func=cmd_info)

    r = sub.add_parser("reference", help="run the parity checker on a fixture directory",
                       **examples("harmon reference tests/fixtures/harmon_reference",
                                  "harmon reference /data/other_fixtures -v"))
    r.add_argument("directory")
    r.add_argument("-v", "--verbose", action="store_true")
    r.set_defaults(func=cmd_reference)

    _add_optional_commands(sub)
    return ap


def _add_optional_commands(sub) -> None:
    """Commands whose modules live in sub-packages (data, eval, train, web)."""
    from .data.export import add_export_command
    from .eval.model_eval import add_eval_model_command
    from .eval.shapes_cli import add_eval_shapes_command
    from .train.cli import add_train_command
    from .train.bpe import add_train_tokenizer_command
    from .train.vae import add_train_vae_command
    from .web.server import add_serve_command

    data = sub.add_parser("data", help="make data sets").add_subparsers(dest="data_command",
                                                                          required=True)
    add_export_command(data)
    ev = sub.add_parser("eval", help="score models").add_subparsers(dest="eval_command",
                                                                     required=True)
    add_eval_shapes_command(ev)
    add_eval_model_command(ev)
    add_train_command(sub)
    add_train_vae_command(sub)
    add_train_tokenizer_command(sub)
    add_serve_command(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError) as e:
        # user errors: one clear line, no traceback
        print(f"harmon: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a missing file, a folder where a file was expected, no permission...
        where = f": {e.filename!r}" if getattr(e, "filename", None) else ""
        print(f"harmon: error: {e.strerror or e}{where}" if e.strerror else f"harmon: error: {e}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    warnings.simplefilter("default")
    sys.exit(main())
