"""An approximate radix tree of the prompt prefixes the router sent to each replica.

Keys are characters of the prompt text (the router has no tokenizer), as in SGLang's router. Each
node records, per replica ("tenant"), when it last sent a prompt through that node. Per tenant the
tree holds at most `max_chars_per_tenant` characters; past that its least recently used leaves go.

Invariant (asserted by check()): for every tenant, `chars[t]` equals the summed edge length of
the nodes tagged with t, and a node tagged with t has its parent tagged with t (paths are whole).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class _Node:
    text: str
    parent: _Node | None
    children: dict[str, _Node] = field(default_factory=dict)
    tenants: dict[str, float] = field(default_factory=dict)   # tenant -> last access time


class PrefixTree:
    def __init__(self, max_chars_per_tenant: int = 1_000_000, max_prompt_chars: int = 16_384):
        self.root = _Node("", None)
        self.max_chars_per_tenant = max_chars_per_tenant
        self.max_prompt_chars = max_prompt_chars
        self.chars: dict[str, int] = {}

    def insert(self, text: str, tenant: str, now: float) -> None:
        """Record that `text` was sent to `tenant` at `now`."""
        text = text[: self.max_prompt_chars]
        node = self.root
        node.tenants[tenant] = now
        i = 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                child = _Node(text[i:], node)
                node.children[text[i]] = child
            else:
                common = _common_len(child.text, text, i)
                if common < len(child.text):
                    child = self._split(child, common)
            if tenant not in child.tenants:
                self.chars[tenant] = self.chars.get(tenant, 0) + len(child.text)
            child.tenants[tenant] = now
            i += len(child.text)
            node = child
        if self.chars.get(tenant, 0) > self.max_chars_per_tenant:
            self.evict(tenant, int(self.max_chars_per_tenant * 0.9))

    def match(self, text: str) -> dict[str, int]:
        """For each tenant, how many leading characters of `text` it was sent (0 if none)."""
        text = text[: self.max_prompt_chars]
        out: dict[str, int] = {t: 0 for t in self.root.tenants}
        node, i = self.root, 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                break
            common = _common_len(child.text, text, i)
            for t in child.tenants:
                out[t] = i + common
            if common < len(child.text):
                break
            i += common
            node = child
        return out

    def evict(self, tenant: str, target_chars: int) -> None:
        """Drop `tenant`'s least recently used leaves until it holds at most `target_chars`."""
        while self.chars.get(tenant, 0) > target_chars:
            leaves = [n for n in self._tagged(tenant) if not any(tenant in c.tenants for c in n.children.values())]
            if not leaves:
                break
            leaves.sort(key=lambda n: n.tenants[tenant])
            for leaf in leaves:
                if self.chars[tenant] <= target_chars:
                    break
                self._untag(leaf, tenant)

    def remove_tenant(self, tenant: str) -> None:
        """Forget everything sent to `tenant` (it restarted or its cache was flushed)."""
        for node in self._tagged(tenant):
            self._untag(node, tenant)
        self.root.tenants.pop(tenant, None)
        self.chars.pop(tenant, None)

    def check(self) -> None:
        totals: dict[str, int] = {}
        for node in self._all():
            for t in node.tenants:
                totals[t] = totals.get(t, 0) + len(node.text)
                assert node.parent is None or t in node.parent.tenants, "a tagged node's parent lost its tag"
        for t, n in self.chars.items():
            assert totals.get(t, 0) == n, f"chars[{t}]={n} but the tree holds {totals.get(t, 0)}"

    def _split(self, child: _Node, at: int) -> _Node:
        assert child.parent is not None
        head = _Node(child.text[:at], child.parent, tenants=dict(child.tenants))
        child.parent.children[head.text[0]] = head
        child.text = child.text[at:]
        child.parent = head
        head.children[child.text[0]] = child
        return head

    def _untag(self, node: _Node, tenant: str) -> None:
        if tenant not in node.tenants or node is self.root:
            return
        del node.tenants[tenant]
        self.chars[tenant] -= len(node.text)
        if not node.tenants and not node.children and node.parent is not None:
            del node.parent.children[node.text[0]]

    def _tagged(self, tenant: str) -> list[_Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            for c in node.children.values():
                if tenant in c.tenants:
                    out.append(c)
                    stack.append(c)
        return out

    def _all(self) -> list[_Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out


def _common_len(edge: str, text: str, start: int) -> int:
    n = min(len(edge), len(text) - start)
    i = 0
    while i < n and edge[i] == text[start + i]:
        i += 1
    return i
