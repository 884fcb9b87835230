"""Paged attention over token-granular KV slots; owns the KV tensors (``KVCacheTensors``).

Per layer: the new tokens' K/V are written to ``k[layer][out_slots]``; then each new token
attends causally over its sequence's context slots (GQA: query head ``h`` reads kv head
``h // (num_heads // num_kv_heads)``, as in HF ``repeat_kv``).

Fast paths: all decoding sequences (query_len == 1) of a batch are one batched gather and one
SDPA call with the contexts padded to the longest and a key mask; prefill chunks run one SDPA per
sequence with a causal mask offset by the cached prefix. Sliding-window layers additionally mask
keys with ``q_pos - k_pos >= window`` (HF's ``kv_idx > q_idx - sliding_window``) and gather only
the keys inside the window.

Invariant: padded key columns always point at a slot the same sequence has written (its first
or last context slot), so masked entries never read uninitialised memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from headway.runtime.llm.batch import ForwardBatch


class KVCacheTensors:
    """Per layer ``k[layer]``, ``v[layer]`` of shape ``[num_slots, num_kv_heads, head_dim]``.

    Both are views into one ``kv[layer]`` of shape ``[num_slots, 2, num_kv_heads, head_dim]`` so
    one write and one gather per layer move a token's K and V together.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        shape = (num_slots, 2, num_kv_heads, head_dim)
        # not zero-filled: no slot is read before its sequence wrote it (the padding invariant
        # above), and filling a 1 GiB pool cost a cold start 0.3-8 s (more when cores are busy);
        # untouched pages are only backed by memory once written
        self.kv = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.k = [t[:, 0] for t in self.kv]
        self.v = [t[:, 1] for t in self.kv]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)


@dataclass
class _Prefill:
    row_start: int
    q_len: int
    ctx_len: int
    slots: torch.Tensor  # [ctx_len]
    fresh: bool  # the context is exactly the new tokens: attend over them without a gather


@dataclass
class AttentionMetadata:
    """Built once per forward from a ``ForwardBatch``; shared by every layer."""

    out_slots: torch.Tensor
    num_tokens: int
    all_decode: bool
    dec_rows: torch.Tensor | None  # [Bd] token rows of decoding sequences
    dec_slots: torch.Tensor | None  # [Bd, Lmax] padded context slots
    dec_lens: torch.Tensor | None  # [Bd]
    prefills: list[_Prefill]
    _dec_views: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _pre_views: dict[tuple[int, int | None], tuple[int, torch.Tensor | None]] = field(default_factory=dict)

    @classmethod
    def from_batch(cls, batch: ForwardBatch, device: torch.device) -> AttentionMetadata:
        dec_rows: list[int] = []
        dec_ctx: list[torch.Tensor] = []
        dec_lens: list[int] = []
        prefills: list[_Prefill] = []
        row = 0
        for q_len, ctx_len, slots in zip(batch.query_lens, batch.context_lens, batch.context_slots):
            if q_len == 1:
                dec_rows.append(row)
                dec_ctx.append(slots)
                dec_lens.append(ctx_len)
            else:
                prefills.append(_Prefill(row, q_len, ctx_len, slots.to(device), q_len == ctx_len))
            row += q_len
        dec_slots = dec_len_t = dec_rows_t = None
        if dec_rows:
            lmax = max(dec_lens)
            padded = torch.empty(len(dec_rows), lmax, dtype=torch.int64)
            for i, (s, n) in enumerate(zip(dec_ctx, dec_lens)):
                padded[i, :n] = s
                padded[i, n:] = s[0]
            dec_slots = padded.to(device)
            dec_len_t = torch.tensor(dec_lens, dtype=torch.int64, device=device)
            dec_rows_t = torch.tensor(dec_rows, dtype=torch.int64, device=device)
        return cls(
            out_slots=batch.out_slots.to(device),
            num_tokens=row,
            all_decode=not prefills,
            dec_rows=dec_rows_t,
            dec_slots=dec_slots,
            dec_lens=dec_len_t,
            prefills=prefills,
        )

    def decode_view(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots ``[Bd, W]`` and key mask ``[Bd, 1, 1, W]`` (True = attended) for decoding.

        Global layers: ``W = Lmax``, the whole padded context. Sliding layers with
        ``window < Lmax``: only each sequence's last ``window`` slots are gathered (``W =
        window``), so a sliding layer's cost does not grow with the context.
        """
        if window not in self._dec_views:
            assert self.dec_slots is not None and self.dec_lens is not None
            lmax = self.dec_slots.shape[1]
            lens = self.dec_lens[:, None]
            if window is None or window >= lmax:
                j = torch.arange(lmax, device=self.dec_slots.device)[None, :]
                mask = j < lens
                if window is not None:
                    mask &= j > (lens - 1 - window)
                slots = self.dec_slots
            else:
                j = torch.arange(window, device=self.dec_slots.device)[None, :]
                start = (lens - window).clamp(min=0)
                idx = torch.minimum(start + j, lens - 1)  # past the end: repeat the last slot
                slots = torch.gather(self.dec_slots, 1, idx)
                mask = j < lens.clamp(max=window)
            self._dec_views[window] = (slots, mask[:, None, None, :])
        return self._dec_views[window]

    def prefill_view(self, index: int, window: int | None) -> tuple[int, torch.Tensor | None]:
        """First context index any query of prefill ``index`` attends, and the ``[q_len,
        ctx_len - start]`` bool mask (None when plain ``is_causal`` is exact)."""
        key = (index, window)
        if key not in self._pre_views:
            p = self.prefills[index]
            if p.fresh and window is None:
                self._pre_views[key] = (0, None)
            else:
                start = 0 if window is None else max(0, p.ctx_len - p.q_len - window + 1)
                dev = p.slots.device
                q_pos = torch.arange(p.ctx_len - p.q_len, p.ctx_len, device=dev)[:, None]
                k_pos = torch.arange(start, p.ctx_len, device=dev)[None, :]
                mask = k_pos <= q_pos
                if window is not None:
                    mask &= k_pos > q_pos - window
                self._pre_views[key] = (start, mask)
        return self._pre_views[key]


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> torch.Tensor:
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        n = scores.shape[-1]
        mask = torch.ones(scores.shape[-2], n, dtype=torch.bool, device=q.device).tril(n - scores.shape[-2])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` (already rotated), ``kv_cache`` one layer's
    ``[num_slots, 2, Hkv, D]`` -> attention output ``[T, Hq*D]``."""
    T, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    kv_cache.index_copy_(0, meta.out_slots, torch.stack((k, v), dim=1))
    if meta.all_decode:
        out = _decode(q, kv_cache, meta, scale, window, softcap, group)
        return out.reshape(T, n_heads * head_dim)
    out = q.new_empty(T, n_heads, head_dim)
    if meta.dec_rows is not None:
        out[meta.dec_rows] = _decode(q[meta.dec_rows], kv_cache, meta, scale, window, softcap, group)
    for i, p in enumerate(meta.prefills):
        rows = slice(p.row_start, p.row_start + p.q_len)
        start, mask = meta.prefill_view(i, window)
        if p.fresh:
            kc, vc = k[rows], v[rows]
        else:
            ctx = kv_cache.index_select(0, p.slots[start:])
            kc, vc = ctx[:, 0], ctx[:, 1]
        o = _attend(
            q[rows].transpose(0, 1).unsqueeze(0),
            kc.transpose(0, 1).unsqueeze(0),
            vc.transpose(0, 1).unsqueeze(0),
            mask,
            scale,
            softcap,
            is_causal=mask is None,
            enable_gqa=group > 1,
        )
        out[rows] = o[0].transpose(0, 1)
    return out.reshape(T, n_heads * head_dim)


def _decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
    softcap: float | None,
    group: int,
) -> torch.Tensor:
    """q ``[Bd, Hq, D]`` -> ``[Bd, Hq, D]``: one gather + one SDPA for all decoding sequences.

    GQA without copying K/V: the ``group`` query heads sharing a kv head become ``group`` query
    rows of that kv head (``[Bd, Hkv, group, D]``).
    """
    slots, mask = meta.decode_view(window)
    bd, n_heads, head_dim = q.shape
    n_kv = n_heads // group
    width = slots.shape[1]
    ctx = kv_cache.index_select(0, slots.reshape(-1)).view(bd, width, 2, n_kv, head_dim)
    kc = ctx[:, :, 0].transpose(1, 2)  # [Bd, Hkv, L, D] (a strided view; SDPA reads it as is)
    vc = ctx[:, :, 1].transpose(1, 2)
    qg = q.view(bd, n_kv, group, head_dim)
    o = _attend(qg, kc, vc, mask, scale, softcap)
    return o.reshape(bd, n_heads, head_dim)
