"""ModelRunner: a Llama-family forward pass over a preallocated, slot-indexed KV cache.

The HF model supplies the modules (embeddings, norms, rotary embedding and the projection layers,
plain, bitsandbytes 4-bit or LoRA-wrapped); this file owns attention and the KV cache so that rows of
different lengths can share one decode step without reallocating or copying the cache.

KV cache: per layer k, v: [slots, kv_heads, max_len, head_dim]. A row owns one slot from admission
to finish. Nothing is moved per step: decode writes one position per row and attends over
cache[slots, :, :max_pos] with a length mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mygpt.lora.layers import set_rows, wrap_model

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int


def model_shape(config) -> ModelShape:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
    )


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        # calloc'd memory: the kernel maps zero pages lazily, so RSS grows only with the positions used
        np_dtype = {torch.float32: np.float32, torch.float16: np.float16}.get(dtype)
        if np_dtype is not None:
            return torch.from_numpy(np.zeros(shape, dtype=np_dtype))
    return torch.zeros(shape, dtype=dtype, device=device)


class ModelRunner:
    """Runs prefill chunks and batched decode steps of a HF Llama-family causal LM."""

    def __init__(
        self,
        model: torch.nn.Module,
        num_slots: int,
        max_len: int,
        dtype: torch.dtype,
        max_loras: int = 0,
        max_lora_rank: int = 16,
        lm_head_dtype: torch.dtype | None = None,
    ):
        model_type = model.config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        window = getattr(model.config, "sliding_window", None)
        if model_type == "mistral" and window and window < max_len:
            max_len = window  # no sliding-window attention here: serve within one window
        self.model = model.eval()
        self.shape = model_shape(model.config)
        self.num_slots = num_slots
        self.max_len = max_len
        self.dtype = dtype
        self.device = next(model.parameters()).device
        self._inner = model.model
        self._layers = list(self._inner.layers)
        s = self.shape
        cache_shape = (num_slots, s.num_kv_heads, max_len, s.head_dim)
        self.k_cache = [_zeros(cache_shape, dtype, self.device) for _ in range(s.num_layers)]
        self.v_cache = [_zeros(cache_shape, dtype, self.device) for _ in range(s.num_layers)]
        # the logits GEMV reads the whole [vocab, hidden] matrix every step: a bfloat16 copy halves
        # the bytes (measured 4x faster on the 2-core CPU); None computes in the model's dtype
        head = model.lm_head.weight
        self._lm_head = head.detach().to(lm_head_dtype) if lm_head_dtype not in (None, head.dtype) else head
        # LoRA: every projection wrapped with max_loras stacked adapter slots (none: plain modules)
        self.max_lora_rank = max_lora_rank
        self.lora_batch, self.lora_layers = (None, {})
        if max_loras:
            self.lora_batch, self.lora_layers = wrap_model(
                model, max_loras, max_lora_rank, dtype, self.device
            )

    # ---------------------------------------------------------------- public API
    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int], start: int, lora_slot: int = -1) -> torch.Tensor:
        """Feeds token_ids at positions start.. of `slot`; returns the last position's logits [V]."""
        self._set_lora([lora_slot])
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, c]
        pos = torch.arange(start, start + len(token_ids), device=self.device)  # [c]
        end = start + len(token_ids)
        # causal mask with an offset: query i (at start+i) sees keys 0..start+i: [1, 1, c, end]
        mask = torch.arange(end, device=self.device)[None, :] <= pos[:, None]
        hidden = self._forward(ids, pos[None, :], slice(slot, slot + 1), (slot, pos), end, mask[None, None])
        return self._logits(hidden[:, -1])[0]

    @torch.inference_mode()
    def decode(
        self,
        slots: list[int],
        token_ids: list[int],
        positions: list[int],
        lora_slots: list[int] | None = None,
    ) -> torch.Tensor:
        """One token for each row (slot, token, position, adapter slot or -1); returns logits [B, V]."""
        self._set_lora(lora_slots or [-1] * len(slots))
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)[:, None]  # [B, 1]
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)  # [B]
        slot_t = torch.tensor(slots, dtype=torch.long, device=self.device)  # [B]
        end = max(positions) + 1
        rows = self._rows(slots, slot_t)
        mask = torch.arange(end, device=self.device)[None, :] <= pos[:, None]  # [B, end]
        hidden = self._forward(ids, pos[:, None], rows, (slot_t, pos), end, mask[:, None, None, :])
        return self._logits(hidden[:, -1])

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copies the first `length` cached positions of src into dst (n choices share a prefill)."""
        for k, v in zip(self.k_cache, self.v_cache, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    # ---------------------------------------------------------------- internals
    def _set_lora(self, lora_slots: list[int]) -> None:
        if self.lora_batch is not None:
            set_rows(self.lora_batch, lora_slots, self.max_lora_rank, self.dtype, self.device)

    @staticmethod
    def _rows(slots: list[int], slot_t: torch.Tensor) -> slice | torch.Tensor:
        # a contiguous run of slots reads the cache as a view; otherwise gather
        first = slots[0]
        if slots == list(range(first, first + len(slots))):
            return slice(first, first + len(slots))
        return slot_t

    def _forward(self, ids, position_ids, rows, write_at, end, mask) -> torch.Tensor:
        # ids: [B, T]; position_ids: [B, T]; rows: cache rows to attend over; write_at: (slot, pos) index
        # for the new keys; mask: bool [B, 1, T, end]
        hidden = self._inner.embed_tokens(ids)
        cos, sin = self._inner.rotary_emb(hidden, position_ids=position_ids)
        for i, layer in enumerate(self._layers):
            residual = hidden
            x = layer.input_layernorm(hidden)
            x = self._attention(i, layer.self_attn, x, cos, sin, rows, write_at, end, mask)
            hidden = residual + x
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
        return self._inner.norm(hidden)

    def _attention(self, i, attn, x, cos, sin, rows, write_at, end, mask) -> torch.Tensor:
        b, t, _ = x.shape
        hd = self.shape.head_dim
        q = attn.q_proj(x).view(b, t, -1, hd)
        k = attn.k_proj(x).view(b, t, -1, hd)
        v = attn.v_proj(x).view(b, t, -1, hd)
        if hasattr(attn, "q_norm"):  # qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, hd]
        q, k = _apply_rope(q, k, cos, sin)
        kc, vc = self.k_cache[i], self.v_cache[i]
        slot, pos = write_at
        if isinstance(slot, int):  # prefill: one row, T positions
            kc[slot, :, pos] = k[0].to(kc.dtype)
            vc[slot, :, pos] = v[0].to(vc.dtype)
        else:  # decode: B rows, one position each
            kc[slot, :, pos] = k[:, :, 0].to(kc.dtype)
            vc[slot, :, pos] = v[:, :, 0].to(vc.dtype)
        keys, values = kc[rows, :, :end], vc[rows, :, :end]  # [B, Hkv, end, hd]
        out = F.scaled_dot_product_attention(
            q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=attn.scaling,
            enable_gqa=self.shape.num_kv_heads != self.shape.num_heads,
        )  # fmt: skip
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.to(self._lm_head.dtype), self._lm_head).float()


def _apply_rope(q, k, cos, sin):
    # cos, sin: [B, T, hd] -> broadcast over heads
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
