"""Parity checker: ``python -m harmon.reference DIR``.

Runs every case of a reference fixture directory (laid out as ``tests/fixtures/harmon_reference``)
through this implementation, replaying the recorded random draws, and compares each output with
the tolerance rule of the fixture contract. Each case builds its model from its own config and
weights. Prints one line per case and ends with ``N passed, N failed``; exits non-zero if any
case fails or cannot run.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from .checkpoints import empty_model, load_weights
from .fixtures import FixtureCase, list_cases
from .generate import StepInfo, sample_tokens, to_uint8
from .models.harmon import HarmonModel
from .models.llm import PromptCache, run_body
from .understand import decode, image_embeddings

# ----------------------------------------------------------------------------------------------
# tolerance rules of the fixture contract


@dataclass
class Check:
    name: str
    ok: bool
    max_abs: float
    rule: str


_LOOSE_LOSS = re.compile(r"^(loss|loss_masked|loss_per_token|vb_per_token|t2i_loss)$")
_PER_TENSOR = re.compile(r"(^sample_|\.step\d+_sampled$|\.tokens_final$)")


def compare(name: str, got: torch.Tensor, ref: torch.Tensor) -> Check:
    """Compare one output with the rule the fixture README gives for its name."""
    if tuple(got.shape) != tuple(ref.shape):
        return Check(name, False, float("inf"), f"shape {tuple(got.shape)} != {tuple(ref.shape)}")
    if not ref.is_floating_point() or name.endswith("gen_timestep_map"):
        if ref.dtype == torch.uint8 and name.endswith("image_uint8"):
            d = (got.long() - ref.long()).abs()
            m = float(d.max()) if d.numel() else 0.0
            return Check(name, m <= 1, m, "abs <= 1")
        d = (got.long() - ref.long()).abs()
        m = float(d.max()) if d.numel() else 0.0
        return Check(name, m == 0, m, "exact")
    got, ref = got.double(), ref.double()
    d = (got - ref).abs()
    m = float(d.max()) if d.numel() else 0.0
    if ref.dtype == torch.float64 and name.endswith("betas"):
        return Check(name, m <= 1e-12, m, "abs <= 1e-12")
    if name.endswith(".pred"):
        return Check(name, m <= 1e-3, m, "abs <= 1e-3")
    if _PER_TENSOR.search(name):
        top = float(ref.abs().max())
        return Check(name, m <= 1e-4 * top, m,
                     f"max abs <= 1e-4 x max|ref|, max|ref| = {top:.3g}: relative {m / max(top, 1e-30):.2g}")
    if _LOOSE_LOSS.match(name):
        ok = bool((d <= 1e-4 + 1e-3 * ref.abs()).all())
        return Check(name, ok, m, "abs <= 1e-4 + 1e-3|ref|")
    ok = bool((d <= 1e-4 + 1e-4 * ref.abs()).all())
    return Check(name, ok, m, "abs <= 1e-4 + 1e-4|ref|")


# ----------------------------------------------------------------------------------------------
# case runners: each returns {output name (without "out."): tensor}


def _model(case: FixtureCase) -> HarmonModel:
    model = empty_model(case.config())
    load_weights(model, case.weights(), dtype=torch.float32, source=str(case.weights_path))
    return model.eval()


def _tokens_to_map(t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return t.reshape(t.shape[0], grid[0], grid[1], t.shape[-1])


@torch.no_grad()
def run_vae(case: FixtureCase, model: HarmonModel) -> dict:
    out, ins = {}, case.tensors
    for key in ins:
        m = re.fullmatch(r"in\.x(\d+)", key)
        if not m:
            continue
        s, x = m.group(1), ins[key]
        grid = model.grid_for(x.shape[-2], x.shape[-1])
        out[f"moments{s}"] = model.vae.encode_moments(x)
        out[f"z{s}"] = _tokens_to_map(model.encode_images(x), grid)
    if "in.z_in" in ins:
        z = ins["in.z_in"]
        out["x_dec"] = model.decode_tokens(z.flatten(1, 2), tuple(z.shape[1:3]))
    for key in ins:
        m = re.fullmatch(r"out\.z(\d+)", key)
        if m and f"out.x_dec_from_z{m.group(1)}" in ins:
            z = ins[key]  # decode the reference latent, as the contract says
            out[f"x_dec_from_z{m.group(1)}"] = model.decode_tokens(z.flatten(1, 2),
                                                                   tuple(z.shape[1:3]))
    return out


@torch.no_grad()
def run_mar(case: FixtureCase, model: HarmonModel) -> dict:
    out = {}
    for h, w in case.params["grids"]:
        g = f"{h}x{w}"
        tokens, mask = case[f"in.tokens_{g}"], case[f"in.mask_{g}"]
        enc = model.mar.encode(tokens, mask, (h, w))
        out[f"enc_{g}"] = enc
        out[f"dec_{g}"] = model.mar.decode(enc, mask, (h, w))
    return out


@torch.no_grad()
def run_diffloss_net(case: FixtureCase, model: HarmonModel) -> dict:
    head = model.mar.diffloss
    net = head.net
    x, t, c = case["in.x"], case["in.t"], case["in.c"]
    half = x.shape[0] // 2
    out = {"net_out": net(x, t, c),
           "net_out_cfg": net.forward_with_cfg(torch.cat([x[:half], x[:half]]), t, c,
                                               case.params.get("cfg", 3.0))}
    target, z, loss_mask = case["in.target"], case["in.z"], case["in.loss_mask"]
    draws = case.draws()
    t1 = draws.randint(head.train_diffusion.num_timesteps, (target.shape[0],))
    terms = head.train_diffusion.training_losses(net, target, t1, z, draws.randn_like(target))
    out.update(loss=terms["loss"].mean().reshape(1), loss_per_token=terms["loss"],
               mse_per_token=terms["mse"], vb_per_token=terms["vb"])
    out["loss_masked"] = head(target, z, loss_mask, draws).reshape(1)
    out["gen_timestep_map"] = torch.as_tensor(head.gen_diffusion.timestep_map, dtype=torch.long)
    out["gen_betas"] = torch.as_tensor(head.gen_diffusion.betas, dtype=torch.float64)
    out["train_betas"] = torch.as_tensor(head.train_diffusion.betas, dtype=torch.float64)
    return out


@torch.no_grad()
def run_diffusion_sample(case: FixtureCase, model: HarmonModel) -> dict:
    draws, out = case.draws(), {}
    for run in case.params["runs"]:
        z = case[f"in.{run['z']}"]
        out[f"sample_{run['name']}"] = model.mar.diffloss.sample(z, run["temperature"], run["cfg"],
                                                                 draws)
    return out


@torch.no_grad()
def run_diffusion_step(case: FixtureCase, model: HarmonModel) -> dict:
    head = model.mar.diffloss
    draws, out = case.draws(), {}
    x, z = case["in.x"], case["in.z"]
    for k in case.params["ks"]:
        step = head.gen_diffusion.guided_step(head.net, x, k, z, case.params["cfg"],
                                              case.params["temperature"], draws.randn_like(x))
        for name in ("eps", "log_variance", "mean", "x_next"):
            out[f"{name}_k{k}"] = step[name]
    return out


@torch.no_grad()
def run_t2i_step(case: FixtureCase, model: HarmonModel) -> dict:
    grid = tuple(case.params["grid"])
    ids, text_mask = case["in.input_ids"], case["in.attention_mask"]
    prompt = PromptCache(model.llm, model.embed_text(ids))
    out = {"prefill_hidden": prompt.hidden}
    s = 1
    while f"in.mask_step{s}" in case.tensors:
        st = model.mar_step(case["in.tokens"], case[f"in.mask_step{s}"], grid, prompt, text_mask)
        out.update({f"step{s}_x_enc": st.x_enc, f"step{s}_llm_in_image": st.llm_in,
                    f"step{s}_position_ids_image": st.position_ids,
                    f"step{s}_llm_hidden_image": st.llm_hidden, f"step{s}_x_enc_new": st.x_enc_new,
                    f"step{s}_z": st.z,
                    f"step{s}_cache_len_after_trim": torch.tensor([prompt.view().get_seq_length()])})
        s += 1
    return out


@torch.no_grad()
def run_t2i_sample(case: FixtureCase, model: HarmonModel) -> dict:
    draws, out = case.draws(), {}
    ids, text_mask = case["in.input_ids"], case["in.attention_mask"]
    for run in case.params["runs"]:
        name, grid = run["name"], tuple(run["grid"])

        def record(info: StepInfo, name=name):
            out[f"{name}.step{info.step}_z_to_pred"] = info.z_to_pred.clone()
            out[f"{name}.step{info.step}_sampled"] = info.sampled.clone()

        tokens = sample_tokens(model, ids, text_mask, grid, draws, num_iter=run["num_iter"],
                               cfg=run["cfg"], cfg_schedule=run.get("cfg_schedule", "constant"),
                               temperature=run["temperature"], on_step=record)
        P = tokens.shape[0] // 2 if run["cfg"] != 1.0 else tokens.shape[0]
        pred = model.decode_tokens(tokens[:P], grid)
        out.update({f"{name}.tokens_final": tokens, f"{name}.pred": pred,
                    f"{name}.image_uint8": to_uint8(pred)})
    return out


@torch.no_grad()
def run_understanding(case: FixtureCase, model: HarmonModel) -> dict:
    p, out = case.params, {}
    for S in p["image_sizes"]:
        ids = case[f"in.input_ids_{S}"]
        img = image_embeddings(model, case[f"in.pixel_values_{S}"])
        embeds = model.splice_images(ids, img, p["image_token_id"])
        hidden = run_body(model.llm, embeds)
        new = decode(model, embeds, torch.ones_like(ids), p["eos_token_id"], p["max_new_tokens"])
        new_ids = torch.tensor(new, dtype=torch.long)
        # teacher-forced margins of the greedy choices
        full = torch.cat([embeds, model.embed_text(new_ids)], dim=1)
        logits = model.logits(run_body(model.llm, full))[0, ids.shape[1] - 1: -1]
        top2 = logits.topk(2, dim=-1).values
        out.update({f"image_embeds_{S}": img, f"inputs_embeds_{S}": embeds,
                    f"logits_last_{S}": model.logits(hidden[:, -1]),
                    f"generated_ids_{S}": new_ids, f"greedy_margin_{S}": top2[:, 0] - top2[:, 1]})
    return out


def run_train_losses(case: FixtureCase, model: HarmonModel) -> dict:
    out = {}
    t2i = model.t2i_loss(case["in.t2i_pixel_values"], case["in.t2i_input_ids"],
                         case["in.t2i_attention_mask"], case.draws())
    out.update(t2i_loss=t2i["loss"].detach().reshape(1), t2i_mask=t2i["mask"],
               t2i_z=t2i["z"].detach())
    i2t = model.i2t_loss(case["in.i2t_pixel_values"], case["in.i2t_input_ids"],
                         case["in.i2t_attention_mask"], case["in.i2t_labels"],
                         case.params.get("image_token_index", -200))
    for key in ("x_enc", "image_embeds", "llm_image_inputs"):
        i2t[key].retain_grad()
    model.zero_grad(set_to_none=True)
    i2t["loss"].backward()
    out.update(i2t_loss=i2t["loss"].detach().reshape(1),
               i2t_grad_llm_image_inputs=i2t["llm_image_inputs"].grad,
               i2t_grad_image_embeds=i2t["image_embeds"].grad,
               i2t_grad_mar_encoder_out=i2t["x_enc"].grad,
               i2t_grad_proj_in_0_weight=model.proj_in[0].weight.grad)
    return out


RUNNERS = {
    "vae": run_vae, "mar_encoder_decoder": run_mar, "diffloss_net": run_diffloss_net,
    "diffusion_sample": run_diffusion_sample, "diffusion_step": run_diffusion_step,
    "t2i_step": run_t2i_step, "t2i_sample": run_t2i_sample, "understanding": run_understanding,
    "train_losses": run_train_losses,
}


def case_kind(name: str) -> str:
    """``"04b_diffusion_step"`` -> ``"diffusion_step"``."""
    return re.sub(r"^\d+[a-z]?_", "", name)


def run_case(case: FixtureCase) -> list[Check]:
    """Run one case and compare every expected output (a missing output is a failure)."""
    kind = case_kind(case.name)
    if kind not in RUNNERS:
        raise ValueError(f"unknown case kind {kind!r} (from {case.name!r}); known: "
                         f"{sorted(RUNNERS)}")
    expected = case.outputs()
    if not expected:
        raise ValueError(f"{case.name} holds no expected output (no out.* tensor in "
                         "io.safetensors): there is nothing to compare")
    torch.manual_seed(0)  # nothing may depend on it: all randomness is replayed
    got = RUNNERS[kind](case, _model(case))
    checks = []
    for name, ref in expected.items():
        if name not in got:
            checks.append(Check(name, False, float("inf"), "not produced"))
        else:
            checks.append(compare(name, got[name].detach().cpu(), ref))
    unused = case.unused_draws()
    if unused is not None:
        checks.append(Check("draws", False, 0.0, unused))
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harmon.reference", description=__doc__.split("\n\n")[0])
    ap.add_argument("directory", help="fixture directory (holds weights/ and NN_case/ folders)")
    ap.add_argument("-k", "--cases", default="", help="only cases whose name contains this")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every output's error")
    args = ap.parse_args(argv)
    try:
        cases = [p for p in list_cases(args.directory) if args.cases in p.name]
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cases:
        print(f"error: no fixture case found in {args.directory}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    passed = failed = 0
    for path in cases:
        t0 = time.perf_counter()
        try:
            case = FixtureCase.load(path)
            checks = run_case(case)
        except Exception as e:  # a case that cannot run is a failed case, reported plainly
            failed += 1
            print(f"FAIL {path.name}: could not run: {type(e).__name__}: {e}")
            if args.verbose:
                traceback.print_exc()
            continue
        bad = [c for c in checks if not c.ok]
        worst = max((c.max_abs for c in checks), default=0.0)
        status = "PASS" if not bad else "FAIL"
        passed, failed = passed + (not bad), failed + bool(bad)
        print(f"{status} {path.name}: {len(checks)} outputs, max abs err {worst:.3g}"
              f" ({time.perf_counter() - t0:.1f}s)")
        for c in checks if args.verbose else bad:
            print(f"    {'ok ' if c.ok else 'BAD'} {c.name}: max abs err {c.max_abs:.3g} ({c.rule})")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
