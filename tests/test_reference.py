"""The parity checker on the shipped fixtures, on a tampered copy, and on fixtures of another
tiny architecture written by this implementation (the checker must not special-case files)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from harmon.configs import HarmonConfig, LLMConfig, MARConfig, VAEConfig
from harmon.fixtures import FixtureCase
from harmon.pipeline import random_model
from harmon.reference import RUNNERS, compare, main
from harmon.rng import RecordingDraws, TorchDraws


def test_all_shipped_cases_pass(fixtures_dir, capsys):
    assert main([str(fixtures_dir)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "9 passed, 0 failed"
    assert sum(line.startswith("PASS") for line in out) == 9


def test_tampered_output_fails(fixtures_dir, tmp_path, capsys):
    shutil.copytree(fixtures_dir / "weights", tmp_path / "weights")
    shutil.copytree(fixtures_dir / "02_mar_encoder_decoder", tmp_path / "02_mar_encoder_decoder")
    io = tmp_path / "02_mar_encoder_decoder" / "io.safetensors"
    t = load_file(str(io))
    t["out.dec_8x8"][0, 0, 0] += 1e-2
    save_file(t, str(io))
    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "BAD dec_8x8" in out and out.strip().endswith("0 passed, 1 failed")


def test_case_that_cannot_run_fails(fixtures_dir, tmp_path, capsys):
    shutil.copytree(fixtures_dir / "weights", tmp_path / "weights")
    shutil.copytree(fixtures_dir / "01_vae", tmp_path / "01_vae")
    (tmp_path / "01_vae" / "io.safetensors").write_bytes(b"not a safetensors file")
    assert main([str(tmp_path)]) == 1
    assert "could not run" in capsys.readouterr().out


def test_case_without_expected_outputs_fails(fixtures_dir, tmp_path, capsys):
    shutil.copytree(fixtures_dir / "weights", tmp_path / "weights")
    shutil.copytree(fixtures_dir / "01_vae", tmp_path / "01_vae")
    io = tmp_path / "01_vae" / "io.safetensors"
    save_file({k: v for k, v in load_file(str(io)).items() if not k.startswith("out.")}, str(io))
    assert main([str(tmp_path)]) == 1
    assert "no expected output" in capsys.readouterr().out


def test_recorded_draws_left_over_fail_the_case(fixtures_dir, tmp_path, capsys):
    # one more recorded draw than the run consumes: the run drew fewer numbers than the reference
    shutil.copytree(fixtures_dir / "weights", tmp_path / "weights")
    case = tmp_path / "04b_diffusion_step"
    shutil.copytree(fixtures_dir / "04b_diffusion_step", case)
    cfg = json.loads((case / "config.json").read_text())
    assert cfg["draws"], "the case records draws"
    cfg["draws"].append(dict(cfg["draws"][-1]))
    (case / "config.json").write_text(json.dumps(cfg))
    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "BAD draws" in out and "recorded draws" in out


def test_missing_directory_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_tolerance_rules():
    ref = torch.tensor([1.0, 2.0])
    assert compare("x", ref + 5e-5, ref).ok
    assert not compare("x", ref + 1e-3, ref).ok
    assert compare("run.pred", ref + 5e-4, ref).ok
    ids = torch.tensor([1, 2])
    assert not compare("generated_ids_64", ids + 1, ids).ok
    img = torch.tensor([10, 20], dtype=torch.uint8)
    assert compare("r.image_uint8", img + 1, img).ok and not compare("r.image_uint8", img + 2, img).ok
    assert not compare("x", torch.zeros(3), torch.zeros(2)).ok


# ---- fixtures of another architecture, written by this implementation ------------------------

def _other_config() -> HarmonConfig:
    return HarmonConfig(
        llm=LLMConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=1024),
        mar=MARConfig(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                      decoder_embed_dim=32, decoder_depth=3, decoder_num_heads=4, diffloss_d=1,
                      diffloss_w=40),
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 2, 2)),
    )


class _Recording(FixtureCase):
    def draws(self):
        if not hasattr(self, "_rec"):
            self._rec = RecordingDraws(TorchDraws(torch.Generator().manual_seed(7)))
        return self._rec


def _write_case(root, name, cfg, params, inputs):
    model = random_model(cfg, seed=3)
    with torch.no_grad():  # random weights at fixture scale, away from exact zeros
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    (root / "weights").mkdir(exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "llm.lm_head.weight"}
    save_file(sd, str(root / "weights" / "w.safetensors"))
    case = _Recording(path=root / name, name=name, params=params, model_config=cfg.to_dict(),
                      tensors=dict(inputs), draw_records=[], weights_path=root / "weights" /
                      "w.safetensors")
    kind = name.split("_", 1)[1]
    outputs = RUNNERS[kind](case, model.eval())
    rec = getattr(case, "_rec", None)
    tensors = {**inputs, **{f"out.{k}": v.detach().contiguous() for k, v in outputs.items()}}
    if rec is not None:
        tensors.update(rec.tensors)
    (root / name).mkdir()
    save_file(tensors, str(root / name / "io.safetensors"))
    (root / name / "config.json").write_text(json.dumps({
        "case": name, "weights": "../weights/w.safetensors", "model": cfg.to_dict(),
        "params": params, "draws": rec.records if rec else []}))


def test_checker_runs_other_dimensions_and_seeds(tmp_path, capsys):
    cfg = _other_config()
    g = torch.Generator().manual_seed(1)
    _write_case(tmp_path, "02_mar_encoder_decoder", cfg, {"grids": [[4, 4], [2, 6]]}, {
        "in.tokens_4x4": torch.randn(2, 16, 16, generator=g),
        "in.mask_4x4": torch.tensor([[1.0] * 6 + [0.0] * 10, [0.0] * 10 + [1.0] * 6]),
        "in.tokens_2x6": torch.randn(2, 12, 16, generator=g),
        "in.mask_2x6": torch.tensor([[1.0, 0.0] * 6, [0.0, 1.0] * 6])})
    ids = torch.randint(5, 300, (4, 9), generator=g)
    am = torch.ones(4, 9, dtype=torch.uint8)
    am[1, 6:] = 0
    _write_case(tmp_path, "06_t2i_sample", cfg, {"runs": [
        {"name": "a", "grid": [2, 3], "num_iter": 3, "cfg": 2.0, "cfg_schedule": "linear",
         "temperature": 0.8}]}, {"in.input_ids": ids, "in.attention_mask": am})
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().endswith("2 passed, 0 failed")
    # and a changed draw is detected
    io = tmp_path / "06_t2i_sample" / "io.safetensors"
    t = load_file(str(io))
    t["draw_0000"] = t["draw_0000"].flip(0)
    save_file(t, str(io))
    assert main([str(tmp_path)]) == 1


@pytest.mark.parametrize("flag", ["-k", "--cases"])
def test_case_filter(fixtures_dir, capsys, flag):
    assert main([str(fixtures_dir), flag, "02_"]) == 0
    assert capsys.readouterr().out.strip().endswith("1 passed, 0 failed")
