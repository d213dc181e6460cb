"""The harmon command line: generate, ask, caption, info, reference; errors without tracebacks."""

import json

import numpy as np
import pytest
from PIL import Image

from harmon.cli import build_parser, main


def test_help_has_examples():
    text = build_parser().format_help()
    assert "harmon generate" in text and "examples:" in text


def test_generate_writes_images(tmp_path, capsys):
    out = tmp_path / "img.png"
    code = main(["generate", "a red circle", "a blue square", "-n", "2", "--steps", "3", "--seed",
                 "1", "--size", "32", "-o", str(out), "--checkpoint", "tiny", "-q"])
    assert code == 0
    files = sorted(tmp_path.glob("img_*.png"))
    assert len(files) == 4 and Image.open(files[0]).size == (32, 32)
    err = capsys.readouterr().err
    assert "random weights" in err and "4 image(s)" in err


def test_generate_best_of_candidates(tmp_path, capsys):
    from harmon import Harmon

    out = tmp_path / "best.png"
    assert main(["generate", "a red circle", "--steps", "3", "--seed", "2", "--candidates", "3",
                 "-o", str(out), "--checkpoint", "tiny", "-q"]) == 0
    want = Harmon.from_pretrained("tiny").generate("a red circle", steps=3, seed=2, candidates=3)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want[0]))
    assert "with tiny (random weights), each the best of 3 by its own reading" in \
        capsys.readouterr().err
    assert main(["generate", "x", "--candidates", "0", "-o", str(tmp_path / "no.png"),
                 "--checkpoint", "tiny", "-q"]) == 2
    assert not (tmp_path / "no.png").exists()


def test_generate_names_free_colours_and_says_so(tmp_path, capsys):
    from harmon import Harmon

    out = tmp_path / "c.png"
    assert main(["generate", "two stars", "--steps", "2", "--seed", "3", "--name-colors", "-o",
                 str(out), "--checkpoint", "tiny", "-q"]) == 0
    want = Harmon.from_pretrained("tiny").generate("two stars", steps=2, seed=3, name_colors=True)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want[0]))
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)  # stdout stays the list of files
    assert f"{out}: drawn as {want[0].info['prompt']!r}" in captured.err
    assert main(["generate", "two stars", "--steps", "2", "--no-name-colors", "-o",
                 str(tmp_path / "p.png"), "--checkpoint", "tiny", "-q"]) == 0
    assert "drawn as" not in capsys.readouterr().err


def test_generate_to_directory_and_rectangular(tmp_path):
    assert main(["generate", "x", "--steps", "2", "--size", "32x48", "-o", str(tmp_path / "d"),
                 "--checkpoint", "tiny", "-q"]) == 0
    assert Image.open(tmp_path / "d" / "00000.png").size == (48, 32)


def test_generate_keeps_existing_images_unless_told(tmp_path, capsys):
    out = tmp_path / "mine.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out)
    args = ["generate", "x", "--steps", "2", "--size", "32", "-o", str(out), "--checkpoint", "tiny",
            "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "mine.png already exists" in err and "--overwrite" in err
    assert Image.open(out).size == (8, 8)  # untouched
    assert main(args + ["--overwrite"]) == 0
    assert Image.open(out).size == (32, 32)


def test_ask_caption_info(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (50, 30), (255, 0, 0)).save(img)
    assert main(["ask", str(img), "What colour?", "--checkpoint", "tiny",
                 "--max-new-tokens", "3"]) == 0
    assert main(["caption", str(img), "--checkpoint", "tiny", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["info", "--checkpoint", "tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device"] == "cpu" and info["total_parameters"] > 0 and not info["trained"]
    assert info["sampling"] == {"cfg": 3.0, "temperature": 1.0, "candidates": 1, "rerank": "yes",
                                "name_colors": False}
    assert main(["info", "--checkpoint", "tiny"]) == 0
    assert "sampling    cfg 3  temperature 1  candidates 1  name_colors off\n" in \
        capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["generate", "a", "--size", "50"], "multiple of 16"),
    (["generate", "a", "--cfg", "0.5"], "cfg must be a finite number >= 1"),
    (["generate", ""], "empty prompt"),
    (["generate", "a", "--device", "quantum"], "unknown device"),
    (["ask", "/no/such.png", "q"], "does not exist"),
    (["generate", "a", "--checkpoint", "/no/model"], "no model at"),
])
def test_errors_are_one_line(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output ./harmon.png may exist where tests run
    if "--checkpoint" not in argv:
        argv = argv + ["--checkpoint", "tiny"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["generate"], ["ask"], ["caption"], ["info"], ["serve"],
                                     ["reference"], ["data", "export"], ["eval", "shapes"],
                                     ["eval", "model"], ["train"], ["train-vae"],
                                     ["train-tokenizer"]])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"harmon {' '.join(command)}" in out.split("examples:")[1]


def test_ask_adds_the_shipped_models_instruction_unless_told_not_to(tmp_path, capsys, monkeypatch):
    from harmon import Harmon

    img = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (40, 30, 20)).save(img)
    asked = []
    real = Harmon.answer

    def spy(self, images, questions, **kw):
        asked.append(kw.get("instruction"))
        return real(self, images, questions, **kw)

    monkeypatch.setattr(Harmon, "answer", spy)
    assert main(["ask", str(img), "How many objects are there?", "--max-new-tokens", "4"]) == 0
    assert main(["ask", str(img), "How many objects are there?", "--max-new-tokens", "4",
                 "--no-instruction"]) == 0
    assert asked == [None, ""]  # the model's own instruction, then none
    capsys.readouterr()
    assert main(["info"]) == 0
    assert "single word or phrase" in capsys.readouterr().out
