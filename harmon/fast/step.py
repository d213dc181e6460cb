"""A faster, output-preserving masked-generation step: the conditions z of the tokens a step
reveals, as ``HarmonModel.mar_step(...).z[to_pred]`` computes them, with less work.

- **MAR encoder once per image, not per guided row**: the conditional and unconditional rows
  carry the same tokens and the same mask, so the encoder (and ``proj_in``) runs on the
  conditional half and its output is shared.
- **A static key/value cache for the prompt**: the prompt's keys and values are written once
  into buffers sized for the whole generation; each step writes its own keys and values after
  them and attends over a view, so no step copies the prompt's cache. The LLM's layers run
  through ``torch.nn.functional`` (SDPA attention, grouped-query heads without repetition) on
  the model's own weights, with the rotary tables computed once per call.
- **The decoder's last block only where it is read**: the head needs z at the revealed
  positions only, so the last decoder block computes its queries, attention output and MLP for
  those rows (keys and values still come from every position), then the norm and the
  diffusion position embedding.

Tested against the reference step (same z up to float rounding) in ``tests/test_fast.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.harmon import HarmonModel
from ..models.llm import PromptCache


class FastStep:
    """The fast engine's MAR step for one generation call.

    Args:
        model: the network (eval mode).
        input_ids: (R, L) right-padded prompt ids (R = 2P with guidance: conditional rows first).
        attention_mask: (R, L) 0/1.
        grid: (h, w) token grid.
        guided: whether rows [P, 2P) are the unconditional copies of rows [0, P).
    """

    def __init__(self, model: HarmonModel, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, grid: tuple[int, int], guided: bool):
        self.model, self.grid, self.guided = model, grid, guided
        llm = model.llm
        cfg = llm.config
        device = model.device
        R, L = input_ids.shape
        N = grid[0] * grid[1]
        self.text_len = L
        self.text_mask = attention_mask.to(device).bool()  # (R, L)
        self.num_heads, self.num_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.eps = cfg.rms_norm_eps

        # prefill as the reference does, then move the keys and values into buffers that also
        # hold every later step's own (at most 64 + N) positions
        prompt = PromptCache(llm, model.embed_text(input_ids.to(device)))
        total = L + model.num_buffers + N
        self.kv = []
        for keys, values in prompt.kv:
            k = keys.new_empty(R, self.num_kv, total, self.head_dim)
            v = torch.empty_like(k)
            k[:, :, :L], v[:, :, :L] = keys, values
            self.kv.append((k, v))
        # rotary tables of every position a step can use (the prompt's real length onwards)
        pos = torch.arange(total, device=device)[None]
        cos, sin = llm.model.rotary_emb(self.kv[0][0], pos)  # (1, total, hd)
        self.cos, self.sin = cos[0], sin[0]
        self.start = self.text_mask.long().sum(dim=1)  # (R,) first position of the image tokens
        # attention mask of the longest step, (R, 1, 64 + N, L + 64 + N) bool: the prompt's real
        # tokens, then causal over the image tokens; a step of l tokens reads its [:l, :L + l]
        l_max = total - L
        causal = torch.ones(l_max, l_max, dtype=torch.bool, device=device).tril()
        self.attn_mask = torch.cat([self.text_mask[:, None, None, :].expand(R, 1, l_max, L),
                                    causal.expand(R, 1, l_max, l_max)], dim=-1)

    # ------------------------------------------------------------------------------------------

    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor,
                 to_pred: torch.Tensor) -> torch.Tensor:
        """z of the tokens to predict.

        Args:
            tokens: (R, N, 16) current tokens; mask: (R, N) 1 = masked.
            to_pred: (R, N) bool, the same number of True per row.
        Returns:
            (n, D) conditions in ``z[to_pred]`` order (row-major).
        """
        m = self.model
        R = tokens.shape[0]
        P = R // 2 if self.guided else R
        x_enc = m.mar.encode(tokens[:P], mask[:P], self.grid)  # (P, 64 + n_vis, D)
        llm_in = m._to_llm_order(m.proj_in(x_enc))
        if self.guided:
            x_enc, llm_in = x_enc.repeat(2, 1, 1), llm_in.repeat(2, 1, 1)
        hidden = self._llm(llm_in)
        x_enc_new = x_enc + m.proj_out(m._from_llm_order(hidden))
        return self._decode_selected(x_enc_new, mask, to_pred)

    def _llm(self, h: torch.Tensor) -> torch.Tensor:
        """The LLM body on (R, l, H) image embeddings after the cached prompt."""
        llm = self.model.llm.model
        R, l, H = h.shape
        L = self.text_len
        nh, nkv, hd = self.num_heads, self.num_kv, self.head_dim
        idx = self.start[:, None] + torch.arange(l, device=h.device)  # (R, l) positions
        cos, sin = self.cos[idx][:, None].to(h.dtype), self.sin[idx][:, None].to(h.dtype)
        attn_mask = self.attn_mask[:, :, :l, :L + l]
        for layer, (kbuf, vbuf) in zip(llm.layers, self.kv):
            a = layer.self_attn
            x = _rms_norm(h, layer.input_layernorm.weight, self.eps)
            q = F.linear(x, a.q_proj.weight, a.q_proj.bias).view(R, l, nh, hd).transpose(1, 2)
            k = F.linear(x, a.k_proj.weight, a.k_proj.bias).view(R, l, nkv, hd).transpose(1, 2)
            v = F.linear(x, a.v_proj.weight, a.v_proj.bias).view(R, l, nkv, hd).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            kbuf[:, :, L:L + l], vbuf[:, :, L:L + l] = k, v
            y = F.scaled_dot_product_attention(q, kbuf[:, :, :L + l], vbuf[:, :, :L + l],
                                               attn_mask=attn_mask, scale=a.scaling,
                                               enable_gqa=nkv != nh)
            h = h + F.linear(y.transpose(1, 2).reshape(R, l, nh * hd), a.o_proj.weight,
                             a.o_proj.bias)
            x = _rms_norm(h, layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            h = h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        return _rms_norm(h, llm.norm.weight, self.eps)

    def _decode_selected(self, x: torch.Tensor, mask: torch.Tensor,
                         to_pred: torch.Tensor) -> torch.Tensor:
        """The MAR decoder, its last block evaluated only at the ``to_pred`` positions."""
        mar = self.model.mar
        B, nb = mask.shape[0], mar.cfg.buffer_size
        full = mar.decoder_input(x, mask, self.grid)  # (B, 64 + N, D)
        blocks = list(mar.decoder_blocks)
        for blk in blocks[:-1]:
            full = blk(full)
        n = int(to_pred[0].sum())
        cols = to_pred.nonzero()[:, 1].view(B, n)  # (B, n) raster positions, ascending per row
        rows = cols + nb
        if blocks:
            sel = _last_block(blocks[-1], full, rows)  # (B, n, D)
        else:
            sel = full.gather(1, rows[:, :, None].expand(B, n, full.shape[-1]))
        sel = mar.decoder_norm(sel)
        pos = mar.pos_embed(mar.diffusion_pos_embed_learned, self.grid, 0).to(sel.dtype)
        return (sel + pos[0, cols]).reshape(B * n, -1)


def _last_block(blk, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A MAR ``Block`` on (B, T, D) whose output is read at ``rows`` (B, n) only -> (B, n, D)."""
    B, T, D = x.shape
    nh = blk.attn.num_heads
    hs = D // nh
    h = blk.norm1(x)
    w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
    kv = F.linear(h, w[D:], b[D:]).view(B, T, 2, nh, hs).permute(2, 0, 3, 1, 4)  # (2, B, nh, T, hs)
    gather = rows[:, :, None].expand(B, rows.shape[1], D)
    x_sel, h_sel = x.gather(1, gather), h.gather(1, gather)  # (B, n, D)
    q = F.linear(h_sel, w[:D], b[:D]).view(B, -1, nh, hs).transpose(1, 2)  # (B, nh, n, hs)
    y = F.scaled_dot_product_attention(q, kv[0], kv[1]).transpose(1, 2).reshape(B, -1, D)
    x_sel = x_sel + blk.attn.proj(y)
    return x_sel + blk.mlp(blk.norm2(x_sel))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Qwen2's RMSNorm: normalise in float32, cast back, then scale
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half layout) of (B, heads, l, hd) with (B, 1, l, hd) tables."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
