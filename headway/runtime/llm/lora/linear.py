"""Applying the resident adapters inside the forward pass: ``LoraLinear`` and ``LoraStep``.

``LoraLinear`` wraps one fused projection of the base model (qkv, o, gate_up, down of one
layer) and adds the LoRA deltas of the rows that carry an adapter. The resident adapters'
weights for that projection sit side by side in one ``ModuleStack``, each padded to the
largest resident rank ``R``: ``a [in, S * P * R]`` (adapter-major, then part: q/k/v or
gate/up, ``P`` parts) and, per part, ``bs[p] [S * R, out_p]``. A step costs a handful of ops
whatever its mix of adapters:

- every row on adapter ``s``: ``h = x @ a[:, s*P*R:(s+1)*P*R]``, then per part
  ``y[:, part] += h[:, p*R:(p+1)*R] @ bs[p][s*R:(s+1)*R]``
- a mix (and base rows): over the span of stacked adapters ``[s0, s1)`` that covers the
  step's adapters, ``h = (x @ a[span]) * mask`` where ``mask[t, c]`` is 1 when column ``c``
  belongs to row ``t``'s adapter (0 for base rows), then per part
  ``y[:, part] += h[:, the span's part-p columns] @ bs[p][span]``

The mix costs ``s1 - s0`` times the single-adapter LoRA flops: small next to the base matmul
for the few adapters a replica keeps resident (``max_loras``), and one op sequence instead of one
per adapter (on a CPU the op count, not the flops, is what a decode step of a small model pays).
Block-diagonal fused B matrices were tried first: their zeros were 70% of the bytes read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from headway.runtime.llm.models.layers import Linear


@dataclass
class ModuleStack:
    """The resident adapters' weights for one fused projection of one layer (see module doc)."""

    a: torch.Tensor | None = None  # [in, S * P * R]
    bs: list[torch.Tensor] = field(default_factory=list)  # per part: [S * R, out_p]


@dataclass
class KindLayout:
    """The stacks' shape for one module kind, the same in every layer: the adapters in stack
    order, the padded rank ``rank`` and the fused output's column slice of every part."""

    names: list[str] = field(default_factory=list)
    rank: int = 0
    outs: list[tuple[int, int]] = field(default_factory=list)

    @property
    def width(self) -> int:
        return len(self.names) * len(self.outs) * self.rank


@dataclass
class LoraStep:
    """What one forward step needs: ``single`` (every row on that adapter), or per kind the span
    of stacked adapters ``[lo, hi)`` covering the step's adapters and the mask over that span."""

    single: str | None
    masks: dict[str, tuple[int, int, torch.Tensor]]


class LoraContext:
    """The step in flight, set by the adapter cache around ``runner.forward`` (None: no adapter rows)."""

    def __init__(self) -> None:
        self.step: LoraStep | None = None


class LoraLinear:
    """A base ``Linear`` plus the LoRA deltas of the current step's adapter rows."""

    def __init__(self, base: Linear, ctx: LoraContext, kind: str, layouts: dict[str, KindLayout]) -> None:
        self.base = base
        self.ctx = ctx
        self.kind = kind
        self.layouts = layouts
        self.stack = ModuleStack()

    @property
    def nbytes(self) -> int:
        return int(self.base.nbytes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        step = self.ctx.step
        a = self.stack.a
        if step is None or a is None:
            return y
        layout = self.layouts[self.kind]
        R, P = layout.rank, len(layout.outs)
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        if step.single is not None:
            if step.single not in layout.names:
                return y
            s = layout.names.index(step.single)
            h = x2 @ a[:, s * P * R:(s + 1) * P * R]
            for p, (lo, hi) in enumerate(layout.outs):
                b = self.stack.bs[p][s * R:(s + 1) * R]
                if P == 1:
                    y2.addmm_(h, b)
                else:
                    y2[:, lo:hi].addmm_(h[:, p * R:(p + 1) * R], b)
            return y
        span = step.masks.get(self.kind)
        if span is None:
            return y
        s0, s1, mask = span
        h = x2 @ a[:, s0 * P * R:s1 * P * R]
        h.mul_(mask)
        if P == 1:
            y2.addmm_(h, self.stack.bs[0][s0 * R:s1 * R])
            return y
        hp = h.view(h.shape[0], s1 - s0, P, R)
        for p, (lo, hi) in enumerate(layout.outs):
            y2[:, lo:hi].addmm_(hp[:, :, p, :].reshape(h.shape[0], -1), self.stack.bs[p][s0 * R:s1 * R])
        return y
