"""KL-16 autoencoder (LDM-style ``AutoencoderKL``), the frozen image tokenizer of Harmon.

Parameter names match the keys of MAR's ``kl16.ckpt["model"]`` exactly, so that checkpoint loads with
``load_state_dict(strict=True)``. The module is pure: the latent scale (0.2325) and the reshaping of
latents into tokens belong to the Harmon model, not here.

Layout (harmon.md §3, with the released widths ch=128, ch_mult=(1,1,2,2,4)):

    encoder: conv_in -> down[i] (res blocks (+attn), downsample except last) -> mid -> norm/swish/conv_out
    quant_conv (1x1): encoder output -> moments = [mean, logvar]  (B, 2*embed_dim, H/16, W/16)
    post_quant_conv (1x1) -> decoder: conv_in -> mid -> up[i] for i = L-1..0 (res blocks (+attn),
    upsample except level 0) -> norm/swish/conv_out
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from harmon.configs import VAEConfig


def group_norm(channels: int, cfg: VAEConfig) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.groupnorm_groups, channels, eps=cfg.groupnorm_eps, affine=True)


class ResnetBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> conv2, plus a (1x1-projected) skip."""

    def __init__(self, c_in: int, c_out: int, cfg: VAEConfig):
        super().__init__()
        self.norm1 = group_norm(c_in, cfg)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out, cfg)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # the checkpoint only has a shortcut conv where the width changes
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, c_in, H, W) -> (B, c_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0 in the tokenizer
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1x1 convs as projections."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.norm = group_norm(channels, cfg)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, 1, HW, C): one head whose "sequence" is the raster of spatial positions
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        h = h.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric zero pad (right/bottom only), as in LDM."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(channels: int, cfg: VAEConfig) -> nn.Module:
    """res -> attn -> res at the lowest resolution (keys mid.block_1, mid.attn_1, mid.block_2)."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, cfg)
    mid.attn_1 = AttnBlock(channels, cfg)
    mid.block_2 = ResnetBlock(channels, channels, cfg)
    return mid


def run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, 2*embed_dim, H/16, W/16) (double_z)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = cfg.ch
        for i, c_out in enumerate(widths):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            has_attn = cfg.resolution // 2 ** i in cfg.encoder_attn_resolutions
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(c_in, c_out, cfg))
                if has_attn:
                    level.attn.append(AttnBlock(c_out, cfg))
                c_in = c_out
            if i != len(widths) - 1:
                level.downsample = Downsample(c_out)
            self.down.append(level)
        self.mid = mid_block(c_in, cfg)
        self.norm_out = group_norm(c_in, cfg)
        z_channels = 2 * cfg.embed_dim if cfg.double_z else cfg.embed_dim
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, embed_dim, h, w) -> (B, 3, 16h, 16w). No output activation."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        c_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.embed_dim, c_in, 3, padding=1)
        self.mid = mid_block(c_in, cfg)
        # built from the lowest resolution upwards, but stored so that up[i] is level i
        levels = []
        for i in reversed(range(len(widths))):
            c_out = widths[i]
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            has_attn = cfg.resolution // 2 ** i in cfg.decoder_attn_resolutions
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(c_in, c_out, cfg))
                if has_attn:
                    level.attn.append(AttnBlock(c_out, cfg))
                c_in = c_out
            if i != 0:
                level.upsample = Upsample(c_out)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c_in, cfg)
        self.conv_out = nn.Conv2d(c_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The KL-16 tokenizer: ``encode`` gives the posterior mean, ``decode`` maps a latent to pixels.

    Images are (B, 3, H, W) in [-1, 1] with H and W multiples of ``cfg.stride`` (16); latents are
    (B, embed_dim, H/16, W/16), unscaled.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        z_channels = 2 * cfg.embed_dim if cfg.double_z else cfg.embed_dim
        moment_channels = 2 * cfg.embed_dim if cfg.use_variational else cfg.embed_dim
        self.quant_conv = nn.Conv2d(z_channels, moment_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 1)

    def initialize_weights(self):
        """Fresh weights for training from scratch: PyTorch's default conv init, unit GroupNorm.

        The LDM/MAR autoencoders are trained from these defaults; there is no special init.
        """
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.GroupNorm)):
                m.reset_parameters()

    def _check_image(self, x: torch.Tensor):
        s = self.cfg.stride
        if x.dim() != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"VAE expects images of shape (B, {self.cfg.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        if x.shape[2] % s or x.shape[3] % s:
            raise ValueError(f"VAE image height and width must be multiples of {s}, "
                             f"got {x.shape[2]}x{x.shape[3]}")

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> moments (B, 2*embed_dim, H/16, W/16): [mean, logvar] (logvar unclamped)."""
        self._check_image(x)
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> posterior mean (mode) (B, embed_dim, H/16, W/16). Harmon never samples."""
        return self.encode_moments(x)[:, : self.cfg.embed_dim]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, embed_dim, h, w) unscaled latent -> image (B, 3, 16h, 16w), roughly in [-1, 1]."""
        if z.dim() != 4 or z.shape[1] != self.cfg.embed_dim:
            raise ValueError(f"VAE decode expects latents of shape (B, {self.cfg.embed_dim}, h, w), "
                             f"got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean: (B, 3, H, W) -> (B, 3, H, W)."""
        return self.decode(self.encode(x))

    # -- the diagonal Gaussian posterior, for training a VAE ---------------------------------

    def _mean_logvar(self, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cfg.use_variational:
            raise ValueError("this VAE is not variational (use_variational=False): no posterior")
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # keeps exp(logvar) finite

    def sample(self, moments: torch.Tensor, draws) -> torch.Tensor:
        """A posterior sample mean + std * eps, eps from ``draws.randn_like``. (B, embed_dim, h, w)."""
        mean, logvar = self._mean_logvar(moments)
        return mean + torch.exp(0.5 * logvar) * draws.randn_like(mean)

    def kl(self, moments: torch.Tensor) -> torch.Tensor:
        """KL(posterior || N(0, I)) summed over channels and positions: (B,)."""
        mean, logvar = self._mean_logvar(moments)
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))
