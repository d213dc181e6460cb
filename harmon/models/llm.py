"""The Qwen2 LLM of Harmon, built by ``transformers`` from a config (no remote code).

Harmon uses the decoder *body* (embeddings, layers, final RMSNorm) on mixed text + image
embeddings, and the tied output projection only to read text logits. The prompt's key/value cache
is computed once per generation and reused by every MAR step; this module owns that logic rather
than relying on a cache class's cropping semantics (which changed between transformers 4 and 5).
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, Qwen2ForCausalLM, Qwen2Model

from ..configs import LLMConfig

# transformers renamed the cache argument of the decoder's forward from ``past_key_values`` to
# ``cache`` (5.2x; the old name warns, then goes away); pass whichever this install takes.
_CACHE_KWARG = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters \
    else "past_key_values"


def build_llm(cfg: LLMConfig) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM (respects an enclosing ``torch.device`` context)."""
    return Qwen2ForCausalLM(cfg.to_qwen2())


def tie_output_embedding(llm: Qwen2ForCausalLM) -> None:
    """Point ``lm_head`` at the input embedding table when the config ties them."""
    if llm.config.tie_word_embeddings:
        llm.lm_head.weight = llm.model.embed_tokens.weight


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions of a right- or left-padded batch: cumsum(mask) - 1, clamped at 0.

    Args:
        attention_mask: (B, L) 0/1.
    Returns:
        (B, L) int64 positions; valid tokens get 0, 1, 2, ... in order.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def run_body(llm: Qwen2ForCausalLM, inputs_embeds: torch.Tensor,
             attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
             cache: DynamicCache | None = None) -> torch.Tensor:
    """Run the decoder stack (with its final norm), causal attention.

    Args:
        inputs_embeds: (B, T, H) new embeddings.
        attention_mask: (B, P + T) 0/1 padding mask over cached + new positions, or None.
        position_ids: (B, T) positions of the new embeddings, or None for P .. P+T-1.
        cache: key/value cache holding P positions; it is extended in place.
    Returns:
        (B, T, H) final-normed hidden states.
    """
    out = llm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    position_ids=position_ids, use_cache=cache is not None, **{_CACHE_KWARG: cache})
    return out.last_hidden_state


class PromptCache:
    """Keys/values of a prompt, computed once and handed to every MAR step as a fresh cache.

    ``view()`` returns a new cache that starts with exactly the prompt's positions; whatever a step
    appends to it is dropped with it, which is the reference's "trim back to the prompt".
    """

    def __init__(self, llm: Qwen2ForCausalLM, text_embeds: torch.Tensor):
        """Prefill: run the body on (B, L_text, H) prompt embeddings, no mask, positions 0..L-1."""
        self.config = llm.config
        cache = DynamicCache(config=llm.config)
        self.hidden = run_body(llm, text_embeds, cache=cache)  # (B, L_text, H)
        self.kv = [(layer.keys, layer.values) for layer in cache.layers]
        self.length = text_embeds.shape[1]

    def view(self) -> DynamicCache:
        return DynamicCache(ddp_cache_data=self.kv, config=self.config)
