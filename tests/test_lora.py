"""Multi-LoRA on tinycoder (fast): the PEFT loader's errors, the per-row LoRA math against a
Hugging Face model with the adapter merged, the adapter cache's LRU / memory cap / pins and its
invariant, batching adapters together, and prefix-cache isolation per adapter."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from headway.digest import chain_hashes
from headway.library import resolve
from headway.runtime.llm.batch import ForwardBatch
from headway.runtime.llm.config import ModelConfig
from headway.runtime.llm.engine import LLMEngine
from headway.runtime.llm.lora import AdapterCache, AdapterError, load_adapter
from headway.runtime.llm.lora.peft import peft_key, random_adapter
from headway.runtime.llm.runner import ModelRunner
from headway.runtime.llm.sequence import SamplingParams
from tests.lora_reference import hf_model

TINY = "tinycoder-test"


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return resolve(TINY).path


@pytest.fixture(scope="module")
def cfg(tiny_dir) -> ModelConfig:
    return ModelConfig.from_model_dir(tiny_dir)


def adapter(tmp_path: Path, cfg: ModelConfig, name: str, **kw) -> Path:
    return random_adapter(tmp_path / name, cfg, std=kw.pop("std", 0.5), **kw)


# ---- loading and its errors ---------------------------------------------------------------------

def load(path: Path, cfg: ModelConfig, max_rank: int = 64):
    return load_adapter("x", path, cfg, max_rank=max_rank, dtype=torch.float32)


def test_loader_reads_peft_layout_and_scale(tmp_path, cfg) -> None:
    path = adapter(tmp_path, cfg, "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    w = load(path, cfg)
    assert w.rank == 4 and w.scale == 2.0 and set(w.modules) == {"qkv"}
    a, bs = w.modules["qkv"][1]
    assert a.shape == (cfg.hidden_size, 12) and [b.shape[1] for b in bs] == [16, 16, 16]
    assert torch.count_nonzero(a[:, 4:8]) == 0 and torch.count_nonzero(bs[1]) == 0  # k_proj not targeted
    conf = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**conf, "use_rslora": True}))
    assert load(path, cfg).scale == pytest.approx(8 / 2)


def test_loader_errors_name_the_file_and_the_problem(tmp_path, cfg) -> None:
    good = adapter(tmp_path, cfg, "good", r=4)
    conf = json.loads((good / "adapter_config.json").read_text())
    cases = []

    def variant(name: str, config: dict | None = None, tensors: dict | None = None, drop: str | None = None) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps(config if config is not None else conf))
        if tensors is not None:
            save_file(tensors, str(d / "adapter_model.safetensors"))
        else:
            (d / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
        if drop:
            (d / drop).unlink()
        return d

    bin_dir = variant("bin", drop="adapter_model.safetensors")
    (bin_dir / "adapter_model.bin").write_bytes(b"pickle")
    cases.append((bin_dir, ".bin"))
    cases.append((variant("noconf", drop="adapter_config.json"), "no adapter_config.json"))
    cases.append((variant("target", {**conf, "target_modules": ["q_proj", "lm_head"]}), "lm_head"))
    cases.append((variant("dora", {**conf, "use_dora": True}), "DoRA"))
    cases.append((variant("ia3", {**conf, "peft_type": "IA3"}), "only LORA"))
    wrong = {peft_key(0, "q_proj", "A"): torch.zeros(4, 99), peft_key(0, "q_proj", "B"): torch.zeros(16, 4)}
    cases.append((variant("shape", tensors=wrong), "another base model"))
    deep = {peft_key(7, "q_proj", "A"): torch.zeros(4, 16), peft_key(7, "q_proj", "B"): torch.zeros(16, 4)}
    cases.append((variant("layer", tensors=deep), "has 2 layers"))
    half = {peft_key(0, "q_proj", "A"): torch.zeros(4, 16)}
    cases.append((variant("half", tensors=half), "no lora_B"))
    cases.append((tmp_path / "missing", "not a directory"))
    for path, needle in cases:
        with pytest.raises(AdapterError) as err:
            load(path, cfg)
        assert needle in str(err.value) and str(path.name) in str(err.value), (path.name, str(err.value))
        assert err.value.status == 400
    with pytest.raises(AdapterError, match="exceeds max_lora_rank=2"):
        load(good, cfg, max_rank=2)


# ---- the math against a merged Hugging Face model ------------------------------------------------

@pytest.mark.slow  # builds three Hugging Face models (~10 s on a shared 2-core machine)
def test_mixed_batch_logits_match_merged_reference(tmp_path, tiny_dir, cfg) -> None:
    """Base rows and rows on two adapters (different ranks, targets, rslora) in one forward step:
    every row's logits equal a Hugging Face model with that adapter merged in."""
    a1 = adapter(tmp_path, cfg, "a1", r=4, lora_alpha=8, seed=1)
    a2 = adapter(tmp_path, cfg, "a2", r=8, lora_alpha=4, seed=2, target_modules=["q_proj", "v_proj", "down_proj"])
    conf = json.loads((a2 / "adapter_config.json").read_text())
    (a2 / "adapter_config.json").write_text(json.dumps({**conf, "use_rslora": True}))
    runner = ModelRunner(tiny_dir, num_slots=256)
    cache = AdapterCache(runner.model, runner.config, dtype=runner.dtype, device=runner.device)
    cache.register("a0", adapter(tmp_path, cfg, "a0", r=8, seed=3))  # stacked first, unused: steps use a span
    cache.register("a1", a1)
    cache.register("a2", a2)
    prompts = {"a1": [5, 17, 300, 41, 9], None: [5, 17, 300, 41, 9], "a2": [88, 7, 1200]}
    slots = [list(range(i * 50, i * 50 + len(p))) for i, p in enumerate(prompts.values())]
    refs = {n: hf_model(tiny_dir, {"a1": a1, "a2": a2}[n] if n else None) for n in prompts}
    for order in (["a1", None, "a2"], ["a2", "a1", None], ["a2", None], ["a1"]):
        ids = [prompts[n] for n in order]
        batch = ForwardBatch.build(ids, [slots[list(prompts).index(n)] for n in order], all_logits=True)
        cache.begin_step((n, len(p)) for n, p in zip(order, ids))
        logits = runner.forward(batch)
        cache.end_step()
        row = 0
        for n, p in zip(order, ids):
            with torch.no_grad():
                want = refs[n](torch.tensor([p])).logits[0]
            got = logits[row:row + len(p)]
            assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (n, (got - want).abs().max())
            row += len(p)
    with torch.no_grad():
        assert not torch.allclose(refs[None](torch.tensor([prompts["a1"]])).logits[0],
                                  refs["a1"](torch.tensor([prompts["a1"]])).logits[0], atol=1e-2)


# ---- the adapter cache ----------------------------------------------------------------------------

def test_lru_eviction_memory_cap_pins_and_reload(tmp_path, tiny_dir, cfg) -> None:
    runner = ModelRunner(tiny_dir, num_slots=64)
    paths = {n: adapter(tmp_path, cfg, n, r=4, seed=i) for i, n in enumerate("abcd")}
    size = load(paths["a"], cfg).nbytes
    cache = AdapterCache(runner.model, runner.config, dtype=runner.dtype, device=runner.device, max_loras=3,
                         memory_bytes=2 * size + size // 2)  # the memory cap binds first: 2 resident
    for n in "abc":
        cache.register(n, paths[n])
        cache.check_invariant()
    assert list(cache.resident) == ["b", "c"] and cache.evictions == 1
    assert cache.names == ("a", "b", "c")
    cache.acquire("a")  # evicted but registered: read back, evicting the LRU ("b")
    cache.check_invariant()
    assert list(cache.resident) == ["c", "a"] and cache.loads == 4
    cache.acquire("c")
    with pytest.raises(AdapterError) as full:  # both residents pinned: no room for b
        cache.acquire("b")
    assert full.value.status == 503 and "in use" in str(full.value)
    cache.release("c")
    cache.acquire("b")  # c is unpinned now: evicted
    cache.check_invariant()
    assert set(cache.resident) == {"a", "b"} and cache.refs == {"a": 1, "b": 1}
    cache.unregister("a")  # pinned: stays resident until its request finishes
    assert "a" in cache.resident and "a" not in cache.names
    with pytest.raises(AdapterError) as busy:
        cache.register("a", paths["d"])
    assert busy.value.status == 409
    cache.release("a")
    assert "a" not in cache.resident
    cache.check_invariant()
    with pytest.raises(AdapterError) as dup:
        cache.register("b", paths["d"])
    assert dup.value.status == 409
    with pytest.raises(AdapterError) as unknown:
        cache.acquire("zzz")
    assert unknown.value.status == 404 and "'b'" in str(unknown.value)
    gen = cache.registered["c"].generation
    cache.unregister("c")
    cache.register("c", paths["d"])
    assert cache.registered["c"].generation > gen  # a re-registered name never reuses cached KV
    cache.release("b")
    cache.check_invariant()
    assert cache.refs == {}


# ---- the engine: batching and prefix-cache isolation ---------------------------------------------

def run_all(engine: LLMEngine, jobs: list[tuple[list[int], str | None]], max_tokens: int = 12) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    async def one(ids: list[int], a: str | None) -> list[int]:
        out: list[int] = []
        async for deltas in engine.generate(ids, params, adapter=a):
            for d in deltas:
                out += d.token_ids
        return out

    async def main() -> list[list[int]]:
        return await asyncio.gather(*[one(ids, a) for ids, a in jobs])

    return asyncio.run(main())


def wait_state(engine: LLMEngine, ok, timeout: float = 5.0) -> dict:
    """The engine's /headway/state snapshot once ``ok(state)`` (it refreshes while idle)."""
    deadline = time.monotonic() + timeout
    while not ok(state := engine.state()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return state


@pytest.fixture
def tiny_engine(tmp_path, tiny_dir, cfg):
    ads = {f"a{i}": str(adapter(tmp_path, cfg, f"a{i}", r=4 + 4 * i, seed=10 + i)) for i in range(2)}
    engine = LLMEngine.launch(tiny_dir, lora_adapters=ads, kv_cache_tokens=1024)
    yield engine
    engine.stop()


def test_mixed_batch_tokens_equal_each_run_alone(tiny_engine) -> None:
    prompt = [1, 450, 4996, 17354, 1701, 432, 12500]
    jobs = [(prompt, None), (prompt, "a0"), (prompt, "a1"), (prompt[:4], "a0")]
    alone = [run_all(tiny_engine, [job])[0] for job in jobs]
    assert len({tuple(t) for t in alone[:3]}) == 3  # the adapters change the output
    assert run_all(tiny_engine, jobs) == alone
    tiny_engine.loras.check_invariant()
    state = wait_state(tiny_engine, lambda s: s["lora"]["requests"] == {"a0": 4, "a1": 2})
    assert state["adapters"] == ["a0", "a1"] and sorted(state["lora"]["resident"]) == ["a0", "a1"]
    assert tiny_engine.loras.refs == {}


def test_prefix_cache_is_isolated_per_adapter(tiny_engine) -> None:
    prompt = list(range(100, 164))
    first = run_all(tiny_engine, [(prompt, "a0")])[0]
    hits = tiny_engine.kv.hit_tokens
    other = run_all(tiny_engine, [(prompt, "a1")])[0]
    assert tiny_engine.kv.hit_tokens == hits  # nothing of a0's KV served to a1
    base = run_all(tiny_engine, [(prompt, None)])[0]
    assert tiny_engine.kv.hit_tokens == hits
    again = run_all(tiny_engine, [(prompt, "a0")])[0]
    assert tiny_engine.kv.hit_tokens > hits  # the same adapter does reuse its own prefix
    assert again == first and len({tuple(first), tuple(other), tuple(base)}) == 3
    # the published digest: each adapter's chain starts from the root published for it
    state = wait_state(tiny_engine, lambda s: set(s["prefix_digest"]["roots"]) == {"a0", "a1"})
    digest, roots = set(state["prefix_digest"]["hashes"]), state["prefix_digest"]["roots"]
    assert len(set(roots.values())) == 2
    assert set(chain_hashes(prompt, 64, root=roots["a0"])) <= digest
    assert set(chain_hashes(prompt, 64)) <= digest            # the base model's own chain
    assert not set(chain_hashes(prompt, 64, root="f" * 16)) & digest
    tiny_engine.prefix_caching = False  # references: each computed from scratch
    assert run_all(tiny_engine, [(prompt, "a1")])[0] == other
    assert run_all(tiny_engine, [(prompt, None)])[0] == base


@pytest.mark.slow  # imports transformers and peft (~5 s)
def test_a_directory_written_by_peft_matches_peft_forward(tmp_path, tiny_dir) -> None:
    """A real `peft` save_pretrained directory (rslora, every projection) loads, and the engine's
    logits on it equal peft's own forward. peft is in the `test` extra (pinned; installs without
    pulling another torch: `pip install --no-deps peft==0.21.2` where torch is already there)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapter do something
                param.normal_(0, 0.3)
    pm.save_pretrained(str(tmp_path / "real"))
    ids = [5, 17, 300, 41, 9]
    with torch.no_grad():
        want = pm(torch.tensor([ids])).logits[0]
    runner = ModelRunner(tiny_dir, num_slots=64)
    cache = AdapterCache(runner.model, runner.config, dtype=runner.dtype, device=runner.device)
    cache.register("real", tmp_path / "real")
    cache.begin_step([("real", len(ids))])
    got = runner.forward(ForwardBatch.build([ids], [list(range(len(ids)))], all_logits=True))
    cache.end_step()
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    plain = runner.forward(ForwardBatch.build([ids], [list(range(len(ids)))], all_logits=True))
    assert not torch.allclose(plain, want, atol=1e-2)  # the adapter matters
