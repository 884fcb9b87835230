"""A BERT encoder in plain torch that runs a batch of variable-length sequences without padding
in its linear layers, plus sentence-transformers pooling.

Owns the forward pass. Layout: the batch's sequences are sorted longest first and their tokens
concatenated into one [T, hidden] tensor; embeddings, every projection, the feed-forward and the
layer norms run on exactly T rows. Only attention needs a rectangle: sequences are cut into
groups of similar length (`attention_groups`) and each group is padded to its longest member,
with a key mask, for one scaled_dot_product_attention call. Invariants: a sequence's output
depends only on its own tokens (pad keys are masked, pad query rows are dropped), so batching
never changes a result beyond float rounding; outputs come back in the caller's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from headway.runtime.embed.spec import EncoderLoadError, EncoderSpec

# a group may hold at most this much padding relative to its real tokens before a new one starts
GROUP_WASTE = 0.25


@dataclass
class _Group:
    start: int            # first row of the group in the packed [T, hidden] tensor
    end: int
    n: int                # sequences
    width: int            # longest sequence in the group
    gather: torch.Tensor  # [n * width] rows of the packed tensor (T = the zero row) per padded slot
    keep: torch.Tensor | None   # [n * width] bool: real slots (None: no padding)
    mask: torch.Tensor | None   # [n, 1, 1, width] bool key mask (None: no padding)


@dataclass
class Pass:
    """A forward pass in progress: the packed hidden states after `layer` layers."""

    order: list[int]      # packed position -> index in the caller's batch
    lengths: list[int]    # per packed sequence, longest first
    groups: list[_Group]
    x: torch.Tensor       # [T, hidden]
    layer: int = 0


def attention_groups(lengths: list[int]) -> list[tuple[int, int]]:
    """Cut sequences sorted longest first into [i, j) ranges whose padding stays within
    GROUP_WASTE of their real tokens."""
    groups: list[tuple[int, int]] = []
    i = 0
    while i < len(lengths):
        width, real, j = lengths[i], lengths[i], i + 1
        while j < len(lengths) and (j - i + 1) * width <= (1 + GROUP_WASTE) * (real + lengths[j]):
            real += lengths[j]
            j += 1
        groups.append((i, j))
        i = j
    return groups


def _activation(name: str):  # noqa: ANN202 - a torch function
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise EncoderLoadError(f"config.json: hidden_act '{name}' is not supported (gelu, gelu_new, relu)")


def _load_state(root: Path) -> dict[str, torch.Tensor]:
    if (root / "model.safetensors").exists():
        from safetensors.torch import load_file

        raw = load_file(str(root / "model.safetensors"))
    elif (root / "pytorch_model.bin").exists():
        raw = torch.load(root / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise EncoderLoadError(f"{root}: no model.safetensors or pytorch_model.bin")
    return {k.removeprefix("bert."): v for k, v in raw.items()}


class BertEncoder:
    def __init__(self, spec: EncoderSpec, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        self.spec, self.dtype, self.device = spec, dtype, torch.device(device)
        w = _load_state(spec.path)

        def get(name: str) -> torch.Tensor:
            if name not in w:
                raise EncoderLoadError(f"{spec.path}: weight '{name}' is missing")
            return w[name].to(self.device, dtype)

        e = "embeddings."
        self.word, self.pos = get(e + "word_embeddings.weight"), get(e + "position_embeddings.weight")
        self.type0 = get(e + "token_type_embeddings.weight")[0]
        self.emb_ln = (get(e + "LayerNorm.weight"), get(e + "LayerNorm.bias"))
        self.layers: list[dict[str, torch.Tensor]] = []
        for i in range(spec.num_layers):
            p = f"encoder.layer.{i}."
            a = p + "attention."
            self.layers.append({
                "qkv_w": torch.cat([get(a + f"self.{n}.weight") for n in ("query", "key", "value")]),
                "qkv_b": torch.cat([get(a + f"self.{n}.bias") for n in ("query", "key", "value")]),
                "o_w": get(a + "output.dense.weight"), "o_b": get(a + "output.dense.bias"),
                "ln1_w": get(a + "output.LayerNorm.weight"), "ln1_b": get(a + "output.LayerNorm.bias"),
                "i_w": get(p + "intermediate.dense.weight"), "i_b": get(p + "intermediate.dense.bias"),
                "f_w": get(p + "output.dense.weight"), "f_b": get(p + "output.dense.bias"),
                "ln2_w": get(p + "output.LayerNorm.weight"), "ln2_b": get(p + "output.LayerNorm.bias"),
            })
        self.act = _activation(spec.hidden_act)

    def _groups(self, lengths: list[int], total: int) -> list[_Group]:
        out, starts = [], [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        for i, j in attention_groups(lengths):
            width, n = lengths[i], j - i
            if all(lengths[k] == width for k in range(i, j)):
                out.append(_Group(starts[i], starts[j], n, width, torch.empty(0), None, None))
                continue
            slots = torch.arange(width).expand(n, width)
            lens = torch.tensor(lengths[i:j]).unsqueeze(1)
            real = slots < lens
            gather = torch.where(real, torch.tensor(starts[i:j]).unsqueeze(1) + slots, torch.tensor(total))
            out.append(_Group(starts[i], starts[j], n, width, gather.reshape(-1).to(self.device),
                              real.reshape(-1).to(self.device), real.view(n, 1, 1, width).to(self.device)))
        return out

    def _attention(self, qkv: torch.Tensor, groups: list[_Group]) -> torch.Tensor:
        s = self.spec
        heads, hd = s.num_heads, s.hidden_size // s.num_heads
        padded = torch.cat([qkv, qkv.new_zeros(1, qkv.shape[1])])
        parts = []
        for g in groups:
            rows = qkv[g.start:g.end] if g.keep is None else padded[g.gather]
            q, k, v = rows.view(g.n, g.width, 3, heads, hd).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask)
            o = o.transpose(1, 2).reshape(g.n * g.width, s.hidden_size)
            parts.append(o if g.keep is None else o[g.keep])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def start(self, batch: list[list[int]]) -> Pass:
        """A forward pass over `batch` (token ids, specials included), embedded but no layer run;
        `step` runs one layer so the engine can slip urgent work in between layers."""
        s = self.spec
        order = sorted(range(len(batch)), key=lambda i: -len(batch[i]))
        lengths = [len(batch[i]) for i in order]
        ids = torch.tensor([t for i in order for t in batch[i]], device=self.device)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(self.device)
        x = self.word[ids] + self.pos[positions] + self.type0
        x = F.layer_norm(x, (s.hidden_size,), *self.emb_ln, s.layer_norm_eps)
        return Pass(order, lengths, self._groups(lengths, ids.shape[0]), x)

    def step(self, p: Pass) -> bool:
        """Run the next layer; True once every layer ran."""
        s, L = self.spec, self.layers[p.layer]
        a = self._attention(F.linear(p.x, L["qkv_w"], L["qkv_b"]), p.groups)
        x = F.layer_norm(F.linear(a, L["o_w"], L["o_b"]) + p.x, (s.hidden_size,), L["ln1_w"], L["ln1_b"],
                         s.layer_norm_eps)
        h = self.act(F.linear(x, L["i_w"], L["i_b"]))
        p.x = F.layer_norm(F.linear(h, L["f_w"], L["f_b"]) + x, (s.hidden_size,), L["ln2_w"], L["ln2_b"],
                           s.layer_norm_eps)
        p.layer += 1
        return p.layer == len(self.layers)

    def finish(self, p: Pass) -> torch.Tensor:
        """Pooled (not normalized) embeddings [len(batch), hidden] in float32, in batch order."""
        while p.layer < len(self.layers):
            self.step(p)
        pooled = self._pool(p.x.float(), p.lengths)
        result = torch.empty_like(pooled)
        result[torch.tensor(p.order, device=self.device)] = pooled
        return result

    def forward(self, batch: list[list[int]]) -> torch.Tensor:
        return self.finish(self.start(batch))

    def _pool(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        mode = self.spec.pooling
        lens = torch.tensor(lengths, device=x.device)
        if mode == "cls":
            starts = torch.cumsum(lens, 0) - lens
            return x[starts]
        if mode == "max":
            return torch.segment_reduce(x, "max", lengths=lens, axis=0)
        summed = torch.segment_reduce(x, "sum", lengths=lens, axis=0)
        if mode == "mean":
            return summed / lens.unsqueeze(1).to(x.dtype)
        return summed / lens.unsqueeze(1).to(x.dtype).sqrt()   # mean_sqrt_len
