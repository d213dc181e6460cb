"""MAR encoder and decoder (the image side of Harmon).

The encoder reads the *visible* latent tokens plus 64 buffer slots; the decoder scatters its input
back onto the full token grid (masked slots hold a learned mask token) and produces one
conditioning vector per image token for the diffusion head. Parameter names follow the MAR
reference (timm ViT blocks), so released checkpoints load under the ``mar.`` prefix.

Position tables are learned for the nominal 16x16 grid; other grids use a bilinear resize of the
256 image rows (the 64 buffer rows are never resized).

``MARConfig.local_conv`` > 0 adds :class:`LocalConv` paths to the encoder's and the decoder's
input, an option that is not part of Harmon (and absent from every released checkpoint).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..configs import MARConfig
from .diffusion import DiffLoss


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with a fused qkv projection (timm layout)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj_drop(self.proj(y))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU, as timm
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm ViT block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, attn_drop: float,
                 proj_drop: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def resize_pos_embed(table: torch.Tensor, grid: tuple[int, int], nominal: int,
                     prefix: int) -> torch.Tensor:
    """Position table for ``grid``.

    Args:
        table: (1, prefix + nominal**2, D) learned table; the first ``prefix`` rows (buffers) are
            kept, the rest is viewed as a nominal x nominal map and bilinearly resized.
        grid: (h, w) token grid.
    Returns:
        (1, prefix + h*w, D)
    """
    h, w = grid
    if (h, w) == (nominal, nominal):
        return table
    head, body = table[:, :prefix], table[:, prefix:]
    D = body.shape[-1]
    body = body.reshape(1, nominal, nominal, D).permute(0, 3, 1, 2)  # (1, D, 16, 16)
    body = F.interpolate(body, size=(h, w), mode="bilinear", align_corners=False)
    body = body.permute(0, 2, 3, 1).reshape(1, h * w, D)
    return torch.cat([head, body], dim=1)


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position table (MAE's): half of the channels encode the row, half the
    column, each as sin and cos of ``dim // 4`` geometric frequencies (periods 2*pi to 2*pi*1e4).

    Returns:
        (h*w, dim) in raster order; every row has norm sqrt(dim / 2).
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos table needs a width divisible by 4, got {dim}")
    freq = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                                torch.arange(w, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        angle = coord[:, None] * freq[None, :]  # (h*w, dim/4)
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


@torch.no_grad()
def add_sincos_positions(mar: "MAR", encoder_norm: float, decoder_norm: float) -> None:
    """Add a 2-D sin-cos table, scaled to the given row norm, to the image rows of the encoder's
    and the decoder's learned position tables (the buffer rows are left alone).

    Why: the tables start at N(0, 0.02) (row norm ~0.3) and are added to token features of norm
    ~3 (encoder input) and ~16 (decoder input), so at first attention cannot tell where a token
    is; a small model trained for a few thousand steps never grows them enough (the shipped
    model's stayed at row norm ~0.4). Starting them at the features' scale gives layout from
    step one; they stay learned parameters.
    """
    nb, n = mar.cfg.buffer_size, mar.cfg.seq_h
    for table, norm in ((mar.encoder_pos_embed_learned, encoder_norm),
                        (mar.decoder_pos_embed_learned, decoder_norm)):
        if norm < 0:
            raise ValueError(f"a sin-cos row norm must be >= 0, got {norm}")
        if norm:
            sc = sincos_2d(n, n, table.shape[-1])
            table[0, nb:] += (sc * (norm / sc.norm(dim=1, keepdim=True))).to(table)


class LocalConv(nn.Module):
    """Two 3x3 convolutions over the token grid, the second zero-initialised, so that adding the
    result to a trained model leaves it unchanged until training moves it.

    Not part of Harmon: an option (``MARConfig.local_conv``) for small models trained from little
    compute. The encoder's copy reads the visible latents (masked ones are zeroed first, so no
    masked value leaks in) and is added to ``z_proj``'s output; the decoder's reads its input rows
    (mask tokens included) and is added to them. Each token then sees its 5x5 neighbourhood from
    the first layer instead of having to learn it through attention.
    """

    def __init__(self, in_dim: int, width: int, out_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, out_dim, 3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.conv1.reset_parameters()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h*w, in_dim) in raster order -> (B, h*w, out_dim)."""
        B, N, C = x.shape
        h, w = grid
        g = x.transpose(1, 2).reshape(B, C, h, w)
        out = self.conv2(F.gelu(self.conv1(g)))
        return out.flatten(2).transpose(1, 2)


class MAR(nn.Module):
    """MAR encoder + decoder + diffusion head (``diffloss``), as used inside Harmon."""

    def __init__(self, cfg: MARConfig):
        super().__init__()
        self.cfg = cfg
        D_enc, D_dec = cfg.encoder_embed_dim, cfg.decoder_embed_dim
        n_pos = cfg.buffer_size + cfg.seq_h ** 2
        # encoder
        self.class_emb = nn.Embedding(cfg.class_num, D_enc)  # unused; kept so checkpoints load
        self.fake_latent = nn.Parameter(torch.zeros(1, D_enc))
        self.z_proj = nn.Linear(cfg.token_dim, D_enc, bias=True)
        self.z_proj_ln = nn.LayerNorm(D_enc, eps=cfg.norm_eps)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n_pos, D_enc))
        self.encoder_conv = LocalConv(cfg.token_dim, cfg.local_conv, D_enc) if cfg.local_conv else None
        self.encoder_blocks = nn.ModuleList(
            [self._block(D_enc, cfg.encoder_num_heads) for _ in range(cfg.encoder_depth)])
        self.encoder_norm = nn.LayerNorm(D_enc, eps=cfg.norm_eps)
        # decoder
        self.decoder_embed = nn.Linear(D_enc, D_dec, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D_dec))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n_pos, D_dec))
        self.decoder_conv = LocalConv(D_dec, cfg.local_conv, D_dec) if cfg.local_conv else None
        self.decoder_blocks = nn.ModuleList(
            [self._block(D_dec, cfg.decoder_num_heads) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(D_dec, eps=cfg.norm_eps)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, cfg.seq_h ** 2, D_dec))
        # per-token diffusion head
        self.diffloss = DiffLoss(cfg)
        self.grad_checkpointing = cfg.grad_checkpointing
        # resized position tables by (table, grid), filled only while sampling with a fast engine
        self.pos_cache: dict | None = None

    def _block(self, dim: int, num_heads: int) -> Block:
        cfg = self.cfg
        return Block(dim, num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.attn_dropout,
                     cfg.proj_dropout)

    def initialize_weights(self):
        """MAR's initialisation for training from scratch (the head initialises itself)."""
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token,
                  self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
                  self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        head = {id(m) for m in self.diffloss.modules()}
        for m in self.modules():
            if isinstance(m, nn.Linear) and id(m) not in head:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.diffloss.net.initialize_weights()
        for conv in (self.encoder_conv, self.decoder_conv):
            if conv is not None:
                conv.reset_parameters()

    def add_local_conv(self, width: int) -> None:
        """Give a model without them the zero-initialised local convolutions of ``width`` (its
        outputs are unchanged until they train); sets ``cfg.local_conv`` so checkpoints record it."""
        if self.cfg.local_conv:
            raise ValueError(f"this MAR already has local convolutions (width {self.cfg.local_conv})")
        if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
            raise ValueError(f"a local convolution width must be a positive integer, got {width!r}")
        ref = self.z_proj.weight
        self.encoder_conv = LocalConv(self.cfg.token_dim, width, self.cfg.encoder_embed_dim).to(ref)
        self.decoder_conv = LocalConv(self.cfg.decoder_embed_dim, width,
                                      self.cfg.decoder_embed_dim).to(ref)
        self.cfg.local_conv = width

    def add_decoder_blocks(self, n: int) -> None:
        """Append ``n`` decoder blocks whose residual branches start at zero (the attention's and
        the MLP's output projections), so the model's outputs are unchanged until they train;
        sets ``cfg.decoder_depth`` so checkpoints record it. A way to give a trained generator
        more depth without touching the encoder (not part of Harmon: an option for small models)."""
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"the number of decoder blocks to add must be a positive integer, "
                             f"got {n!r}")
        cfg, ref = self.cfg, self.decoder_norm.weight
        for _ in range(n):
            blk = self._block(cfg.decoder_embed_dim, cfg.decoder_num_heads)
            for lin in (blk.attn.qkv, blk.mlp.fc1):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
            for lin in (blk.attn.proj, blk.mlp.fc2):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
            self.decoder_blocks.append(blk.to(ref).train(self.training))
        cfg.decoder_depth = len(self.decoder_blocks)

    def pos_embed(self, table: torch.Tensor, grid: tuple[int, int], prefix: int) -> torch.Tensor:
        if self.pos_cache is None:
            return resize_pos_embed(table, grid, self.cfg.seq_h, prefix)
        key = (id(table), table._version, grid)
        if key not in self.pos_cache:
            self.pos_cache[key] = resize_pos_embed(table, grid, self.cfg.seq_h, prefix)
        return self.pos_cache[key]

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """MAR encoder.

        Args:
            tokens: (B, N, 16) latent tokens in raster order, N = h*w.
            mask: (B, N), 1 = masked (dropped). Every row must mask the same number of tokens.
            grid: (h, w).
        Returns:
            (B, 64 + n_vis, D_enc): the 64 buffers first, then the visible tokens in raster order.
        """
        B, N, _ = tokens.shape
        nb = self.cfg.buffer_size
        x = self.z_proj(tokens)  # (B, N, D)
        if self.encoder_conv is not None:
            keep = (~mask.bool()).unsqueeze(-1).to(tokens.dtype)
            x = x + self.encoder_conv(tokens * keep, grid)
        buffers = self.fake_latent.to(x.dtype).expand(B, nb, -1)
        x = torch.cat([buffers, x], dim=1)  # (B, 64+N, D)
        x = x + self.pos_embed(self.encoder_pos_embed_learned, grid, nb).to(x.dtype)
        x = self.z_proj_ln(x)
        visible = _visible_with_buffers(mask, nb)  # (B, 64+N) bool
        x = x[visible].reshape(B, -1, x.shape[-1])  # (B, 64+n_vis, D)
        x = self._run(self.encoder_blocks, x)
        return self.encoder_norm(x)

    def decoder_input(self, x: torch.Tensor, mask: torch.Tensor,
                      grid: tuple[int, int]) -> torch.Tensor:
        """The decoder's input sequence: (B, 64 + n_vis, D_enc) encoder output -> (B, 64 + N,
        D_dec), embedded, scattered onto the grid (masked slots hold the mask token), plus the
        decoder's position table (and the decoder's local convolution of the image rows, if any)."""
        B, N = mask.shape
        nb = self.cfg.buffer_size
        x = self.decoder_embed(x)
        visible = _visible_with_buffers(mask, nb)
        full = self.mask_token.to(x.dtype).expand(B, nb + N, -1).clone()  # (B, 64+N, D)
        full[visible] = x.reshape(-1, x.shape[-1])
        full = full + self.pos_embed(self.decoder_pos_embed_learned, grid, nb).to(x.dtype)
        if self.decoder_conv is None:
            return full
        image = full[:, nb:]
        return torch.cat([full[:, :nb], image + self.decoder_conv(image, grid)], dim=1)

    def decode(self, x: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """MAR decoder.

        Args:
            x: (B, 64 + n_vis, D_enc) encoder output (after the LLM residual in Harmon).
            mask: (B, N) the mask the encoder saw.
            grid: (h, w).
        Returns:
            (B, N, D_dec): one conditioning vector per image token.
        """
        nb = self.cfg.buffer_size
        full = self._run(self.decoder_blocks, self.decoder_input(x, mask, grid))
        full = self.decoder_norm(full)[:, nb:]  # (B, N, D)
        return full + self.pos_embed(self.diffusion_pos_embed_learned, grid, 0).to(full.dtype)


def _visible_with_buffers(mask: torch.Tensor, num_buffers: int) -> torch.Tensor:
    """(B, N) float/bool mask (1 = masked) -> (B, num_buffers + N) bool, True = kept."""
    counts = mask.bool().sum(dim=1)
    if counts.numel() and bool((counts != counts[0]).any()):
        raise ValueError("every row of a MAR batch must mask the same number of tokens; got "
                         f"masked counts {counts.tolist()}")
    buffers = torch.ones(mask.shape[0], num_buffers, dtype=torch.bool, device=mask.device)
    return torch.cat([buffers, ~mask.bool()], dim=1)
