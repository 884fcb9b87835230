"""Model code vs Hugging Face transformers on tiny random configs (llama, qwen2, gemma3):
prefill, chunked prefill, decode, mixed batches, shuffled non-contiguous slots, bf16."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    Qwen2Config,
)

from headway.runtime.llm.batch import ForwardBatch
from headway.runtime.llm.config import ModelConfig, UnsupportedModelError
from headway.runtime.llm.runner import ModelRunner

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)


def _configs() -> dict[str, object]:
    return {
        "llama": LlamaConfig(  # Llama 3.x style rope scaling, active within the test's lengths
            **COMMON, head_dim=16, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16},
        ),
        "qwen2": Qwen2Config(**COMMON, rope_theta=1000000.0, tie_word_embeddings=True,
                             architectures=["Qwen2ForCausalLM"]),
        "gemma3": Gemma3TextConfig(
            **{**COMMON, "num_hidden_layers": 4}, head_dim=32, sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=24, final_logit_softcapping=30.0, attn_logit_softcapping=None,
            architectures=["Gemma3ForCausalLM"],
        ),
    }


def _save_random(cfg: object, path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in name else 0.2))
    model.eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def arch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    name = request.param
    path = tmp_path_factory.mktemp(name)
    hf = _save_random(_configs()[name], path)
    return name, path, hf


def _hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def test_config_reads_family_specifics(arch) -> None:
    name, path, _ = arch
    cfg = ModelConfig.from_model_dir(path)
    assert cfg.family == name
    if name == "gemma3":
        assert cfg.layer_windows == (5, None, 5, None)
        assert cfg.layer_ropes[0].theta == 10000.0 and cfg.layer_ropes[1].theta == 1_000_000.0
        assert cfg.attn_scale == pytest.approx(24**-0.5)
        assert cfg.final_logit_softcap == 30.0 and cfg.attn_logit_softcap is None
        assert cfg.embed_scale == pytest.approx(8.0) and cfg.activation == "gelu_pytorch_tanh"
    if name == "qwen2":
        assert cfg.attention_bias and cfg.tie_word_embeddings
    if name == "llama":
        assert not cfg.tie_word_embeddings and cfg.head_dim == 16
        assert cfg.layer_ropes[0].rope_type == "llama3" and cfg.layer_ropes[0].factor == 8.0


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_chunked_prefill_and_decode_match_hf(arch, device: str) -> None:
    """Two sequences, shuffled non-contiguous slots; step 1 prefills A's first chunk and all of
    B, step 2 prefills A's second chunk while B decodes, then both decode. Sequence length 19
    exceeds Gemma's sliding window (5). Same code on CUDA when one is present."""
    name, path, hf = arch
    runner = ModelRunner(path, num_slots=97, device=device)
    rng = random.Random(1)
    slots = list(range(97))
    rng.shuffle(slots)
    seq_a = [rng.randrange(VOCAB) for _ in range(19)]
    seq_b = [rng.randrange(VOCAB) for _ in range(17)]
    slots_a, slots_b = slots[:19], slots[40:57]
    ref_a, ref_b = _hf_logits(hf, seq_a), _hf_logits(hf, seq_b)
    tol = dict(atol=2e-4, rtol=1e-4)

    out = runner.forward(ForwardBatch.build([seq_a[:6], seq_b[:12]], [slots_a[:6], slots_b[:12]], all_logits=True))
    assert out.dtype == torch.float32 and out.shape == (18, VOCAB)
    assert out.device.type == device
    out = out.cpu()
    torch.testing.assert_close(out[:6], ref_a[:6], **tol)
    torch.testing.assert_close(out[6:], ref_b[:12], **tol)

    out = runner.forward(ForwardBatch.build([seq_a[6:15], seq_b[12:13]], [slots_a[:15], slots_b[:13]], all_logits=True)).cpu()
    torch.testing.assert_close(out[:9], ref_a[6:15], **tol)
    torch.testing.assert_close(out[9], ref_b[12], **tol)

    for t in range(4):
        pa, pb = 15 + t, 13 + t
        out = runner.forward(ForwardBatch.build([[seq_a[pa]], [seq_b[pb]]], [slots_a[: pa + 1], slots_b[: pb + 1]])).cpu()
        assert out.shape == (2, VOCAB)
        torch.testing.assert_close(out[0], ref_a[pa], **tol)
        torch.testing.assert_close(out[1], ref_b[pb], **tol)


def test_bfloat16_close_to_float32(arch) -> None:
    _, path, _ = arch
    ids = [random.Random(2).randrange(VOCAB) for _ in range(12)]
    logits = {}
    for dtype in ("float32", "bfloat16"):
        runner = ModelRunner(path, dtype=dtype, num_slots=16)
        assert runner.kv.k[0].dtype == getattr(torch, dtype)
        pre = runner.forward(ForwardBatch.build([ids[:10]], [list(range(10))], all_logits=True))
        dec = runner.forward(ForwardBatch.build([ids[10:11]], [list(range(11))]))
        logits[dtype] = torch.cat([pre, dec])
    f32, bf16 = logits["float32"], logits["bfloat16"]
    assert bf16.dtype == torch.float32
    err = (bf16 - f32).abs().max() / f32.abs().max()
    assert err < 0.05, f"bf16 relative error {err:.4f}"
    assert (bf16.argmax(-1) == f32.argmax(-1)).float().mean() >= 0.8


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*Qwen2ForCausalLM.*Gemma3ForCausalLM"):
        ModelConfig.from_model_dir(tmp_path)


def test_missing_and_unexpected_tensors(arch, tmp_path: Path) -> None:
    name, path, _ = arch
    if name != "llama":
        pytest.skip("one architecture is enough for the weight-name checks")
    tensors = load_file(str(path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        ModelRunner(tmp_path, num_slots=4)
    save_file({**tensors, "model.layers.9.extra.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensor.*model.layers.9.extra.weight"):
        ModelRunner(tmp_path, num_slots=4)


def test_bad_batches_get_clear_errors(arch) -> None:
    name, path, _ = arch
    if name != "llama":
        pytest.skip("batch validation is architecture independent")
    runner = ModelRunner(path, num_slots=8)
    with pytest.raises(ValueError, match="context must include"):
        ForwardBatch.build([[1, 2, 3]], [[0, 1]])
    with pytest.raises(ValueError, match=r"out_slots must lie in \[0, 8\)"):
        runner.forward(ForwardBatch.build([[1, 2]], [[3, 8]]))
    with pytest.raises(ValueError, match="dtype 'float64' not supported"):
        ModelRunner(path, dtype="float64", num_slots=4)


def test_attention_logit_softcap_matches_hf_eager() -> None:
    """Softcapped paged attention (prefill chunk over a cached prefix + a decode in one batch)
    equals transformers' eager attention with softcap (Gemma-2 style tanh capping)."""
    from types import SimpleNamespace

    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    from headway.runtime.llm.attention import AttentionMetadata, paged_attention

    torch.manual_seed(3)
    hq, hkv, d, n = 4, 2, 8, 9
    q, k, v = torch.randn(n, hq, d) * 3, torch.randn(n, hkv, d) * 3, torch.randn(n, hkv, d)
    causal = torch.full((n, n), float("-inf")).triu(1)
    ref, _ = eager_attention_forward(
        SimpleNamespace(num_key_value_groups=2, head_dim=d, training=False),
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        causal[None, None], scaling=0.3, softcap=5.0,
    )
    ref = ref[0].reshape(n, hq * d)
    kv_cache = torch.zeros(32, 2, hkv, d)
    slots = [30, 2, 17, 5, 9, 11, 20, 1, 4]
    # the same sequence twice: as a cached prefix of 4 + a 5-token chunk, the decode of its last token
    kv_cache[slots[:4]] = torch.stack((k[:4], v[:4]), dim=1)
    batch = ForwardBatch.build([[0] * 5], [slots])
    meta = AttentionMetadata.from_batch(batch, torch.device("cpu"))
    out = paged_attention(q[4:], k[4:], v[4:], kv_cache, meta, scale=0.3, softcap=5.0)
    torch.testing.assert_close(out, ref[4:], atol=1e-5, rtol=1e-5)
    batch = ForwardBatch.build([[0]], [slots])
    meta = AttentionMetadata.from_batch(batch, torch.device("cpu"))
    out = paged_attention(q[8:], k[8:], v[8:], kv_cache, meta, scale=0.3, softcap=5.0)
    torch.testing.assert_close(out, ref[8:], atol=1e-5, rtol=1e-5)


def test_gemma3_legacy_config_keys() -> None:
    """Older Gemma 3 config.json files: sliding_window_pattern + rope_local_base_freq."""
    cfg = ModelConfig.from_dict({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 10,
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 7, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 8, "sliding_window": 4, "sliding_window_pattern": 6,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 8,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    })
    assert cfg.layer_windows == (4, 4, 4, 4, 4, None, 4)
    assert cfg.layer_ropes[5].theta == 1e6 and cfg.layer_ropes[5].rope_type == "linear"
    assert cfg.layer_ropes[0].theta == 1e4 and cfg.layer_ropes[0].rope_type == "default"


def test_kv_capacity_from_memory_budget(arch) -> None:
    name, path, _ = arch
    if name != "qwen2":
        pytest.skip("capacity arithmetic is architecture independent")
    runner = ModelRunner(path, kv_memory_gb=0.001)
    per_slot = runner.config.kv_bytes_per_token * 4
    assert runner.num_slots == int(0.001 * (1 << 30)) // per_slot
    assert runner.kv.nbytes == runner.num_slots * per_slot <= 0.001 * (1 << 30)
    with pytest.raises(ValueError, match="num_slots must be >= 1"):
        ModelRunner(path, num_slots=0)


def test_sliding_window_mixed_lengths_match_dense_reference() -> None:
    """Decodes shorter and longer than the window plus a prefill chunk over a cached prefix,
    in one call: equal to dense masked attention per sequence (keys with q - k < window)."""
    from headway.runtime.llm.attention import AttentionMetadata, paged_attention

    torch.manual_seed(4)
    hq, hkv, d, window = 4, 1, 8, 4
    lens = {"a": 2, "b": 7, "c": 12}  # decodes: context lengths
    chunk_ctx, chunk_q = 11, 5  # prefill chunk: 6 cached + 5 new
    rng = random.Random(5)
    free = list(range(64))
    rng.shuffle(free)
    kv_cache = torch.zeros(64, 2, hkv, d)
    seqs = []
    for n in [*lens.values(), chunk_ctx]:
        slots = [free.pop() for _ in range(n)]
        k, v, q = torch.randn(n, hkv, d), torch.randn(n, hkv, d), torch.randn(n, hq, d)
        seqs.append((slots, k, v, q))
    new_q = [1, 1, 1, chunk_q]
    for (slots, k, v, _), nq in zip(seqs, new_q):  # the cached prefix is already written
        kv_cache[slots[: len(slots) - nq]] = torch.stack((k, v), 1)[: len(slots) - nq]
    batch = ForwardBatch.build([[0] * nq for nq in new_q], [s[0] for s in seqs])
    meta = AttentionMetadata.from_batch(batch, torch.device("cpu"))
    cat = lambda i: torch.cat([s[i][len(s[0]) - nq :] for s, nq in zip(seqs, new_q)])  # noqa: E731
    out = paged_attention(cat(3), cat(1), cat(2), kv_cache, meta, scale=0.35, window=window)
    refs = []
    for (slots, k, v, q), nq in zip(seqs, new_q):
        n = len(slots)
        qp = torch.arange(n - nq, n)[:, None]
        kp = torch.arange(n)[None, :]
        mask = (kp <= qp) & (kp > qp - window)
        scores = torch.einsum("qhd,khd->hqk", q[n - nq :], k.expand(n, hq, d)) * 0.35
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        refs.append(torch.einsum("hqk,khd->qhd", probs, v.expand(n, hq, d)).reshape(nq, hq * d))
    torch.testing.assert_close(out, torch.cat(refs), atol=1e-5, rtol=1e-5)


def test_dtype_choice_is_measured_once_and_names_what_is_allowed() -> None:
    from headway.runtime.llm.device import _faster_dtype, choose_dtype

    picked = choose_dtype("auto", "cpu")
    assert picked in (torch.float32, torch.bfloat16)
    assert choose_dtype("auto", "cpu") is picked and _faster_dtype.cache_info().hits >= 1  # probed once
    assert choose_dtype("float32", "cpu") is torch.float32 and choose_dtype("bfloat16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        choose_dtype("float16", "cpu")


def test_dtype_probe_is_remembered_per_machine_in_the_node_cache(tmp_path, monkeypatch) -> None:
    import json

    from headway.runtime.llm.device import _faster_dtype, choose_dtype

    monkeypatch.setenv("HEADWAY_CACHE", str(tmp_path))
    _faster_dtype.cache_clear()
    picked = choose_dtype("auto", "cpu")
    [memo] = (tmp_path / "probes").glob("dtype-*.json")
    assert json.loads(memo.read_text()) == {"dtype": str(picked).removeprefix("torch.")}
    other = "float32" if picked is torch.bfloat16 else "bfloat16"
    memo.write_text(json.dumps({"dtype": other}))   # a later process reads the answer instead of probing
    _faster_dtype.cache_clear()
    assert str(choose_dtype("auto", "cpu")).removeprefix("torch.") == other
    memo.write_text("not json")                     # a damaged memo is probed again and rewritten
    _faster_dtype.cache_clear()
    again = choose_dtype("auto", "cpu")
    assert json.loads(memo.read_text()) == {"dtype": str(again).removeprefix("torch.")}
    _faster_dtype.cache_clear()
