"""Applying the resident adapters inside the forward pass: ``LoraLinear`` and ``LoraStep``.

``LoraLinear`` wraps one fused projection of the base model (qkv, o, gate_up, down of one
layer) and adds the LoRA deltas of the rows that carry an adapter. The weights of every
resident adapter for that projection sit side by side in one ``ModuleStack``
(``a [in, C]``, ``b [C, out]``; adapter ``n`` owns columns ``ranges[n]`` of ``a`` and rows
``ranges[n]`` of ``b``), so a step costs the same few ops whatever its mix of adapters:

- every row on one adapter: ``y += (x @ a[:, s:e]) @ b[s:e]``             (2 matmuls)
- a mix (and base rows):    ``y += ((x @ a) * mask) @ b``                  (2 matmuls, 1 mul)

where ``mask[t, c]`` is 1 when column ``c`` belongs to row ``t``'s adapter (0 for base rows).
The mix costs ``C / r`` times the single-adapter LoRA flops, which stays small next to the base
matmul for the few adapters a replica keeps resident (``max_loras``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModuleStack:
    """The resident adapters' weights for one fused projection of one layer."""

    a: torch.Tensor | None = None  # [in, C]
    b: torch.Tensor | None = None  # [C, out]


@dataclass
class KindLayout:
    """Which columns of a module kind's stacks belong to which adapter (the same for every layer)."""

    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    width: int = 0


@dataclass
class LoraStep:
    """What one forward step needs: ``single`` (every row on that adapter) or per-kind masks."""

    single: str | None
    masks: dict[str, torch.Tensor]


class LoraContext:
    """The step in flight, set by the adapter cache around ``runner.forward`` (None: no adapter rows)."""

    def __init__(self) -> None:
        self.step: LoraStep | None = None


class LoraLinear:
    """A base ``Linear`` plus the LoRA deltas of the current step's adapter rows."""

    def __init__(self, base, ctx: LoraContext, kind: str, layouts: dict[str, KindLayout]) -> None:  # type: ignore[no-untyped-def]
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
        a, b = self.stack.a, self.stack.b
        if step is None or a is None or b is None:
            return y
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        if step.single is not None:
            rng = self.layouts[self.kind].ranges.get(step.single)
            if rng is not None:
                y2.addmm_(x2 @ a[:, rng[0]:rng[1]], b[rng[0]:rng[1]])
            return y
        mask = step.masks.get(self.kind)
        if mask is not None:
            h = x2 @ a
            h.mul_(mask)
            y2.addmm_(h, b)
        return y
