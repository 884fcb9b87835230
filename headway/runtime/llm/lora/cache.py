"""AdapterCache: owns the LoRA adapters of one engine: which are registered (name -> PEFT
directory), which are resident in memory, and the stacked weights the forward pass reads.

Registered adapters are what clients may name in ``model``; a registered adapter that is not
resident is read from its directory again when a request needs it. Residency is an LRU under
two caps, ``max_loras`` adapters and ``memory_bytes``; an adapter is pinned while requests use
it (``acquire`` / ``release``) and a pinned adapter is never evicted.

Invariants (``check_invariant``, asserted in tests):
    len(resident) <= max_loras and sum(nbytes of resident) <= memory_bytes
    refs[name] > 0  =>  name is resident
    every layout range belongs to a resident adapter, and each stack's width == layout width

Touched only by the engine's loop thread (and by the constructor before the loop starts); the
forward pass reads ``ctx.step`` and the stacks, which change only between steps.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from headway.runtime.llm.config import ModelConfig
from headway.runtime.llm.lora.adapter import FUSED, AdapterError, LoraWeights, load_adapter
from headway.runtime.llm.lora.linear import KindLayout, LoraContext, LoraLinear, LoraStep

log = logging.getLogger("headway.llm")


@dataclass(frozen=True)
class Registration:
    name: str
    path: Path
    generation: int  # distinct per registration: a re-registered name never shares cached KV


class AdapterCache:
    # `model` stays unannotated: _attach swaps its layers' Linear projections for LoraLinear
    # wrappers, an assignment DecoderModel's attribute types (rightly) do not allow elsewhere
    def __init__(self, model, cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device,  # type: ignore[no-untyped-def]
                 max_loras: int = 4, max_rank: int = 64, memory_bytes: int = 512 << 20,
                 on_event: Callable[[str, str], None] | None = None) -> None:
        if max_loras < 1 or max_rank < 1 or memory_bytes < 1:
            raise ValueError(f"max_loras, max_lora_rank and the LoRA memory cap must be >= 1, got {max_loras}, "
                             f"{max_rank}, {memory_bytes}")
        self.model, self.cfg, self.dtype, self.device = model, cfg, dtype, device
        self.max_loras, self.max_rank, self.memory_bytes = max_loras, max_rank, memory_bytes
        self.registered: dict[str, Registration] = {}
        self.resident: OrderedDict[str, LoraWeights] = OrderedDict()  # least recently used first
        self.refs: Counter[str] = Counter()
        self.ctx = LoraContext()
        self.layouts: dict[str, KindLayout] = {k: KindLayout() for k in FUSED}
        self._linears: dict[str, list[LoraLinear]] | None = None
        self._generation = 0
        self.names: tuple[str, ...] = ()  # registered names, readable from any thread
        self.loads = self.evictions = 0
        self.requests: Counter[str] = Counter()
        self.on_event = on_event or (lambda event, name: None)  # ("request" | "load" | "evict", adapter)

    # ---- registration -------------------------------------------------------------------------

    def read(self, name: str, path: str | Path) -> LoraWeights:
        """Read and validate an adapter directory (no state change; safe off the loop thread)."""
        return load_adapter(name, path, self.cfg, max_rank=self.max_rank, dtype=self.dtype, device=self.device)

    def register(self, name: str, path: str | Path, weights: LoraWeights | None = None) -> None:
        """Make ``name`` servable; ``weights`` (from ``read``) become resident if they fit."""
        if not name or not isinstance(name, str):
            raise AdapterError("lora_name must be a non-empty string")
        if name in self.registered:
            raise AdapterError(f"adapter {name!r} is already loaded (from {self.registered[name].path}); unload "
                               "it first or pick another name", status=409)
        if name in self.resident:  # unloaded, still pinned by running requests
            raise AdapterError(f"adapter {name!r} was unloaded but {self.refs[name]} requests still use it; retry "
                               "when they finish", status=409)
        weights = weights if weights is not None else self.read(name, path)
        self._check_fits_alone(weights)
        self._generation += 1
        self.registered[name] = Registration(name, Path(path), self._generation)
        self.names = tuple(self.registered)
        if self._make_room(weights.nbytes, keep=()):
            self._add_resident(name, weights)

    def unregister(self, name: str) -> None:
        """Stop serving ``name``; its memory is freed now, or when its last request finishes."""
        if name not in self.registered:
            raise AdapterError(f"adapter {name!r} is not loaded; loaded are {list(self.names)}", status=404)
        del self.registered[name]
        self.names = tuple(self.registered)
        if self.refs[name] == 0 and name in self.resident:
            self._evict(name)

    # ---- use by requests ----------------------------------------------------------------------

    def acquire(self, name: str) -> Registration:
        """Pin ``name`` for one request, reading it back from disk if it was evicted."""
        reg = self.registered.get(name)
        if reg is None:
            raise AdapterError(f"adapter {name!r} is not loaded; loaded are {list(self.names)}", status=404)
        if name in self.resident:
            self.resident.move_to_end(name)
        else:
            weights = self.read(name, reg.path)
            if not self._make_room(weights.nbytes, keep=(name,)):
                raise AdapterError(
                    f"adapter {name!r} cannot be made resident now: {len(self.resident)} adapters "
                    f"({self.resident_bytes >> 20} MiB) are in use by running requests (max_loras={self.max_loras}, "
                    f"lora_memory_mb={self.memory_bytes >> 20}); retry shortly", status=503)
            self._add_resident(name, weights)
        self.refs[name] += 1
        self.requests[name] += 1
        self.on_event("request", name)
        return reg

    def release(self, name: str) -> None:
        self.refs[name] -= 1
        if self.refs[name] <= 0:
            del self.refs[name]
            if name not in self.registered and name in self.resident:
                self._evict(name)

    # ---- the forward step ---------------------------------------------------------------------

    def begin_step(self, row_adapters: Iterable[tuple[str | None, int]]) -> None:
        """Set up the step whose rows are ``(adapter or None, row count)`` runs, in batch order."""
        runs = [(n, k) for n, k in row_adapters if k > 0]
        names = {n for n, _ in runs}
        if names == {None} or not names:
            self.ctx.step = None
            return
        if len(names) == 1:
            self.ctx.step = LoraStep(single=next(iter(names)), masks={})
            return
        total = sum(k for _, k in runs)
        masks: dict[str, tuple[int, int, torch.Tensor]] = {}
        for kind, layout in self.layouts.items():
            present = sorted(layout.names.index(n) for n in names if n is not None and n in layout.names)
            if not present:
                continue
            s0, s1 = present[0], present[-1] + 1
            block = len(layout.outs) * layout.rank
            mask = torch.zeros(total, (s1 - s0) * block, dtype=self.dtype, device=self.device)
            row = 0
            for n, k in runs:
                if n is not None and n in layout.names:
                    s = layout.names.index(n) - s0
                    mask[row:row + k, s * block:(s + 1) * block] = 1
                row += k
            masks[kind] = (s0, s1, mask)
        self.ctx.step = LoraStep(single=None, masks=masks)

    def end_step(self) -> None:
        self.ctx.step = None

    # ---- residency ----------------------------------------------------------------------------

    @property
    def resident_bytes(self) -> int:
        return sum(w.nbytes for w in self.resident.values())

    def _check_fits_alone(self, weights: LoraWeights) -> None:
        if weights.nbytes > self.memory_bytes:
            raise AdapterError(f"{weights.path}: adapter {weights.name!r} needs {weights.nbytes / 2**20:.1f} MiB, more "
                               f"than lora_memory_mb={self.memory_bytes / 2**20:.0f}; raise the cap")

    def _make_room(self, nbytes: int, keep: tuple[str, ...]) -> bool:
        """Evict unpinned adapters, least recently used first, until ``nbytes`` more fit."""
        while len(self.resident) >= self.max_loras or self.resident_bytes + nbytes > self.memory_bytes:
            victim = next((n for n in self.resident if self.refs[n] == 0 and n not in keep), None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, name: str) -> None:
        del self.resident[name]
        self.evictions += 1
        self.on_event("evict", name)
        self._restack()
        log.info("LoRA adapter %r evicted from memory", name)

    def _add_resident(self, name: str, weights: LoraWeights) -> None:
        self.resident[name] = weights
        self.loads += 1
        self.on_event("load", name)
        self._restack()
        log.info("LoRA adapter %r resident (r=%d, %.1f MiB)", name, weights.rank, weights.nbytes / 2**20)

    def _attach(self) -> dict[str, list[LoraLinear]]:
        """Wrap the model's fused projections once, when the first adapter becomes resident
        (a replica that never serves an adapter keeps its plain layers)."""
        if self._linears is None:
            linears: dict[str, list[LoraLinear]] = {k: [] for k in FUSED}
            for layer in self.model.layers:
                layer.qkv = LoraLinear(layer.qkv, self.ctx, "qkv", self.layouts)
                layer.o = LoraLinear(layer.o, self.ctx, "o", self.layouts)
                layer.mlp.gate_up = LoraLinear(layer.mlp.gate_up, self.ctx, "gate_up", self.layouts)
                layer.mlp.down = LoraLinear(layer.mlp.down, self.ctx, "down", self.layouts)
                for kind, lin in (("qkv", layer.qkv), ("o", layer.o), ("gate_up", layer.mlp.gate_up),
                                  ("down", layer.mlp.down)):
                    linears[kind].append(lin)
            self._linears = linears
        return self._linears

    def _restack(self) -> None:
        """Rebuild every module's side-by-side stack from the resident adapters, each padded to
        the largest resident rank (see ``linear``)."""
        linears = self._attach()
        for kind, lins in linears.items():
            owners = [(n, w.rank, w.modules[kind]) for n, w in self.resident.items() if kind in w.modules]
            col = 0
            R = max((r for _, r, _ in owners), default=0)
            layout = KindLayout(names=[n for n, _, _ in owners], rank=R)
            if owners:
                first = owners[0][2][0][1]
                for b in first:
                    layout.outs.append((col, col + b.shape[1]))
                    col += b.shape[1]
            self.layouts[kind] = layout
            for i, lin in enumerate(lins):
                if not owners:
                    lin.stack.a, lin.stack.bs = None, []
                    continue
                a_cols: list[torch.Tensor] = []
                b_parts: list[list[torch.Tensor]] = [[] for _ in layout.outs]
                for _, r, layers in owners:
                    a, bs = layers[i]
                    for p, b in enumerate(bs):
                        a_cols.append(_pad_cols(a[:, p * r:(p + 1) * r], R))
                        b_parts[p].append(_pad_rows(b, R))
                lin.stack.a = torch.cat(a_cols, dim=1).contiguous()
                lin.stack.bs = [torch.cat(bp, dim=0).contiguous() for bp in b_parts]

    def check_invariant(self) -> None:
        assert len(self.resident) <= self.max_loras, (len(self.resident), self.max_loras)
        assert self.resident_bytes <= self.memory_bytes, (self.resident_bytes, self.memory_bytes)
        for name, k in self.refs.items():
            assert k > 0 and name in self.resident, (name, k)
        for kind, layout in self.layouts.items():
            assert set(layout.names) <= set(self.resident), (kind, layout.names)
            for lin in (self._linears or {}).get(kind, []):
                width = 0 if lin.stack.a is None else lin.stack.a.shape[1]
                assert width == layout.width, (kind, width, layout.width)

    def stats(self) -> dict[str, object]:
        return {"resident": list(self.resident), "resident_mb": round(self.resident_bytes / 2**20, 1),
                "max_loras": self.max_loras, "memory_mb": round(self.memory_bytes / 2**20, 1),
                "loads": self.loads, "evictions": self.evictions, "requests": dict(self.requests)}


def _pad_cols(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[1] == n else torch.cat([t, t.new_zeros(t.shape[0], n - t.shape[1])], dim=1)


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[0] == n else torch.cat([t, t.new_zeros(n - t.shape[0], t.shape[1])], dim=0)
