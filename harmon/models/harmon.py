"""The Harmon network: VAE + MAR encoder + Qwen2 LLM + MAR decoder + diffusion head.

This module holds the network and its two forward paths (one masked-generation step, and the
visual embeddings for understanding) plus the three training losses. The sampling loop is in
:mod:`harmon.generate`, answering questions in :mod:`harmon.understand`.

Token layout: a latent (B, 16, h, w) becomes (B, h*w, 16) in raster order, channels last.
Buffer order: the MAR side keeps its 64 buffer slots first; the LLM sees them last (so every
buffer attends to the whole prompt and all visible tokens under causal attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs import HarmonConfig
from .llm import PromptCache, build_llm, positions_from_mask, run_body
from .mar import MAR
from .vae import AutoencoderKL


@dataclass
class StepOutput:
    """Intermediate tensors of one masked-generation step (all batch-first)."""

    x_enc: torch.Tensor  # (B, 64+n_vis, D) MAR encoder output, buffers first
    llm_in: torch.Tensor  # (B, n_vis+64, H) LLM inputs, buffers last
    position_ids: torch.Tensor  # (B, n_vis+64) RoPE positions of llm_in
    llm_hidden: torch.Tensor  # (B, n_vis+64, H) final-normed LLM outputs, buffers last
    x_enc_new: torch.Tensor  # (B, 64+n_vis, D) after the LLM residual
    z: torch.Tensor  # (B, N, D_dec) MAR decoder output, one condition per token


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` backward."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _ScaleGrad.apply(x, scale)


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    # the connectors: Linear -> SiLU -> Linear (weights at indices 0 and 2)
    return nn.Sequential(nn.Linear(d_in, d_out), nn.SiLU(), nn.Linear(d_out, d_out))


def off_background(pixels: torch.Tensor, background: torch.Tensor,
                   threshold: float = 0.3) -> torch.Tensor:
    """Bool mask of the pixels of ``pixels`` (..., 3, H, W) in [-1, 1] whose colour differs from
    ``background`` (broadcastable, e.g. (..., 3, 1, 1)) by over ``threshold`` summed over the
    channels -> (..., H, W)."""
    return (pixels - background).abs().sum(dim=-3) > threshold


def median_colour(pixels: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) -> (..., 3, 1, 1) each image's per-channel median: its background colour
    when most of it is background."""
    return pixels.flatten(-2).median(dim=-1).values[..., None, None]


def noisy_context(tokens: torch.Tensor, mask: torch.Tensor, bound: float, draws) -> torch.Tensor:
    """``tokens`` (B, N, C) with Gaussian noise on the visible ones (``mask`` (B, N), 0 =
    visible), its std drawn per token uniformly from [0, ``bound``].

    The uniform draw is the normal CDF of a normal draw, so the draw sources need no new kind.
    """
    B, N, C = tokens.shape
    u = 0.5 * (1.0 + torch.erf(draws.randn((B, N, 1), device=tokens.device) / math.sqrt(2.0)))
    noise = draws.randn((B, N, C), device=tokens.device).to(tokens.dtype)
    return tokens + (1.0 - mask)[..., None] * (bound * u).to(tokens.dtype) * noise


def foreground_share(pixels: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, N) the share of each token's stride x stride pixels
    (raster order, as :meth:`HarmonModel.encode_images`) :func:`off_background` of the image's
    median colour: a label-free foreground measure for images on a flat or finely textured
    background, such as ShapeWorld's."""
    x = pixels.float()
    off = off_background(x, median_colour(x)).unsqueeze(1).float()  # (B, 1, H, W)
    return F.avg_pool2d(off, stride).flatten(1)


class HarmonModel(nn.Module):
    """The network. Attribute names match the released checkpoints (``vae``, ``llm``, ``mar``,
    ``proj_in``, ``proj_out``)."""

    def __init__(self, cfg: HarmonConfig):
        super().__init__()
        self.cfg = cfg
        D, H = cfg.mar.encoder_embed_dim, cfg.llm.hidden_size
        self.vae = AutoencoderKL(cfg.vae)
        self.llm = build_llm(cfg.llm)
        self.mar = MAR(cfg.mar)
        self.proj_in = _mlp(D, H)
        self.proj_out = nn.Sequential(nn.Linear(H, H), nn.SiLU(), nn.Linear(H, D))
        self.vae.requires_grad_(False)  # the VAE is frozen in every stage

    # ------------------------------------------------------------------------------------------
    # shapes and the VAE

    @property
    def num_buffers(self) -> int:
        return self.cfg.mar.buffer_size

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_in[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_in[0].weight.device

    def grid_for(self, height: int, width: int | None = None) -> tuple[int, int]:
        """Token grid (h, w) of an image size; the size must be a multiple of the VAE stride."""
        width = height if width is None else width
        s = self.cfg.mar.vae_stride
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % s:
                raise ValueError(f"image {name} must be a positive multiple of {s}, got {v!r}")
        return height // s, width // s

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> latent tokens (B, h*w, 16): posterior mean x vae_scale."""
        self.grid_for(pixels.shape[-2], pixels.shape[-1])
        z = self.vae.encode(pixels) * self.cfg.vae_scale  # (B, 16, h, w)
        return z.permute(0, 2, 3, 1).flatten(1, 2)

    def decode_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Latent tokens (B, h*w, 16) -> images (B, 3, 16h, 16w), roughly in [-1, 1]."""
        B, N, C = tokens.shape
        h, w = grid
        if N != h * w:
            raise ValueError(f"{N} tokens do not fill a {h}x{w} grid")
        # a channels-last view (no copy), as the reference decodes
        z = (tokens.reshape(B, h, w, C) / self.cfg.vae_scale).permute(0, 3, 1, 2)
        return self.vae.decode(z)

    # ------------------------------------------------------------------------------------------
    # MAR <-> LLM coupling

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.model.embed_tokens(input_ids)

    def _to_llm_order(self, e: torch.Tensor) -> torch.Tensor:
        nb = self.num_buffers
        return torch.cat([e[:, nb:], e[:, :nb]], dim=1)  # [visible..., buffers]

    def _from_llm_order(self, h: torch.Tensor) -> torch.Tensor:
        nb = self.num_buffers
        return torch.cat([h[:, -nb:], h[:, :-nb]], dim=1)  # [buffers, visible...]

    def visual_embeddings(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Understanding path: all tokens visible -> (B, N + 64, H), image tokens then buffers."""
        mask = torch.zeros(tokens.shape[:2], device=tokens.device, dtype=tokens.dtype)
        x_enc = self.mar.encode(tokens, mask, grid)
        return self._to_llm_order(self.proj_in(x_enc))

    def mar_step(self, tokens: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int],
                 prompt: PromptCache, text_mask: torch.Tensor) -> StepOutput:
        """One masked-generation step on top of a cached prompt.

        Args:
            tokens: (B, N, 16) current tokens (values at masked positions are ignored).
            mask: (B, N) 1 = still masked.
            prompt: the prompt's cache (B rows, L_text positions).
            text_mask: (B, L_text) 0/1 padding mask of the prompt (right padded).
        """
        x_enc = self.mar.encode(tokens, mask, grid)
        llm_in = self._to_llm_order(self.proj_in(x_enc))  # (B, l, H)
        l = llm_in.shape[1]
        full_mask = torch.cat([text_mask.long(), text_mask.new_ones(text_mask.shape[0], l).long()],
                              dim=1)
        position_ids = positions_from_mask(full_mask)[:, -l:]
        hidden = run_body(self.llm, llm_in, full_mask, position_ids, prompt.view())
        x_enc_new = x_enc + self.proj_out(self._from_llm_order(hidden))
        z = self.mar.decode(x_enc_new, mask, grid)
        return StepOutput(x_enc, llm_in, position_ids, hidden, x_enc_new, z)

    def t2i_condition(self, tokens: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int],
                      text_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Training path: one LLM pass (no cache) over [prompt ; visible ; buffers] -> z (B, N, D)."""
        x_enc = self.mar.encode(tokens, mask, grid)
        llm_in = self._to_llm_order(self.proj_in(x_enc))
        l = llm_in.shape[1]
        full_mask = torch.cat([text_mask.long(), text_mask.new_ones(text_mask.shape[0], l).long()],
                              dim=1)
        hidden = run_body(self.llm, torch.cat([text_embeds, llm_in.to(text_embeds.dtype)], dim=1),
                          full_mask, positions_from_mask(full_mask))[:, -l:]
        x_enc_new = x_enc + self.proj_out(self._from_llm_order(hidden))
        return self.mar.decode(x_enc_new, mask, grid)

    def splice_images(self, input_ids: torch.Tensor, image_embeds: torch.Tensor,
                      image_token_id: int) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced, in order, by ``image_embeds``.

        Args:
            input_ids: (B, L) with exactly N+64 placeholders per row that has an image.
            image_embeds: (B_img, N+64, H) one row per image, in the order the rows appear.
        Returns:
            (B, L, H)
        """
        is_image = input_ids == image_token_id
        n_per_row = is_image.sum(dim=1)
        expected = image_embeds.shape[1]
        bad = [(i, int(n)) for i, n in enumerate(n_per_row) if int(n) not in (0, expected)]
        if bad or int((n_per_row > 0).sum()) != image_embeds.shape[0]:
            raise ValueError(f"each prompt with an image needs exactly {expected} image "
                             f"placeholders and one image per such prompt; got placeholder counts "
                             f"{n_per_row.tolist()} for {image_embeds.shape[0]} image(s)")
        # the placeholder id may be outside the vocabulary (-200 in training data)
        embeds = self.embed_text(input_ids.masked_fill(is_image, 0))
        embeds = embeds.clone()
        embeds[is_image] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)
        return embeds

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm.lm_head(hidden)

    # ------------------------------------------------------------------------------------------
    # training losses

    def t2i_loss(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, draws) -> dict[str, torch.Tensor]:
        """Masked diffusion loss (training.md §1.1).

        Draw order: one permutation per row, then the mask ratio (in training, with
        ``mar.full_mask_prob``, one more draw: whether every token is masked), then (in
        training, with ``mar.context_noise``) the visible tokens' noise levels and noise, then
        the head's timesteps and noise. Returns ``loss`` plus the ``mask`` (B, N) and the
        conditions ``z`` (B, N, D).
        """
        grid = self.grid_for(pixel_values.shape[-2], pixel_values.shape[-1])
        with torch.no_grad():
            target = self.encode_images(pixel_values.to(self.vae_dtype())).to(self.dtype)
        B, N, C = target.shape
        orders = torch.stack([draws.permutation(N, device=target.device) for _ in range(B)])
        ratio = draws.truncnorm(self.cfg.mar.mask_ratio_min, 1.0, 1.0, self.cfg.mar.mask_ratio_std)
        if self.training and self.cfg.mar.full_mask_prob:
            # drawn only when asked for, so MAR's draw stream is unchanged otherwise
            if int(draws.randint(1_000_000, (1,))) < 1_000_000 * self.cfg.mar.full_mask_prob:
                ratio = 1.0
        num_masked = min(N, int(math.ceil(N * ratio)))
        mask = torch.zeros(B, N, device=target.device, dtype=target.dtype)
        mask.scatter_(1, orders[:, :num_masked], 1.0)
        context = target
        if self.training and self.cfg.mar.context_noise:
            context = noisy_context(target, mask, self.cfg.mar.context_noise, draws)
        z = self.t2i_condition(context, mask, grid, self.embed_text(input_ids), attention_mask)
        weights = mask
        if self.cfg.mar.foreground_weight:
            share = foreground_share(pixel_values, self.cfg.mar.vae_stride).to(mask.dtype)
            weights = mask * (1.0 + self.cfg.mar.foreground_weight * share)
        mul = self.cfg.mar.diffusion_batch_mul
        loss = self.mar.diffloss(target.reshape(B * N, C).repeat(mul, 1),
                                 z.reshape(B * N, -1).repeat(mul, 1),
                                 weights.reshape(B * N).repeat(mul), draws)
        return {"loss": loss, "mask": mask, "z": z}

    def i2t_loss(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, labels: torch.Tensor,
                 image_token_id: int = -200) -> dict[str, torch.Tensor]:
        """Next-token loss on answers, image spliced in; 0.1 x gradient into the visual path.

        Returns ``loss`` and the intermediates ``x_enc`` (MAR encoder output), ``image_embeds``
        (before the gradient scale) and ``llm_image_inputs`` (after it) for inspection.
        """
        grid = self.grid_for(pixel_values.shape[-2], pixel_values.shape[-1])
        with torch.no_grad():
            tokens = self.encode_images(pixel_values.to(self.vae_dtype())).to(self.dtype)
        mask = torch.zeros(tokens.shape[:2], device=tokens.device, dtype=tokens.dtype)
        x_enc = self.mar.encode(tokens, mask, grid)
        image_embeds = self._to_llm_order(self.proj_in(x_enc))
        scaled = scale_grad(image_embeds, self.cfg.grad_scale)
        embeds = self.splice_images(input_ids, scaled, image_token_id)
        loss = self._lm_loss(embeds, attention_mask, labels)
        return {"loss": loss, "x_enc": x_enc, "image_embeds": image_embeds,
                "llm_image_inputs": scaled}

    def text_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Text-only LM loss. A zero-weighted dummy image pass keeps every MAR/connector parameter
        in the graph, which DDP requires."""
        loss = self._lm_loss(self.embed_text(input_ids), attention_mask, labels)
        n = self.cfg.mar.seq_h
        dummy = torch.zeros(1, n * n, self.cfg.mar.token_dim, device=self.device, dtype=self.dtype)
        dummy_mask = torch.zeros(1, n * n, device=self.device, dtype=self.dtype)
        x = self.mar.decode(self.proj_out(self.proj_in(self.mar.encode(dummy, dummy_mask, (n, n))))
                            .to(self.dtype), dummy_mask, (n, n))
        return {"loss": loss + 0.0 * x.mean()}

    def _lm_loss(self, embeds: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        hidden = run_body(self.llm, embeds, attention_mask)  # (B, L, H)
        hidden, targets = hidden[:, :-1], labels[:, 1:]
        keep = targets >= 0
        if not bool(keep.any()):
            raise ValueError("the batch has no supervised token (every label is -100)")
        logits = self.logits(hidden[keep]).float()  # (n_kept, V)
        return F.cross_entropy(logits, targets[keep])

    def vae_dtype(self) -> torch.dtype:
        return self.vae.decoder.conv_out.weight.dtype
