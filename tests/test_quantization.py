"""Int8 weight-only quantization: the layer, the model, the server, and `headway eval ppl`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from headway.runtime.llm.batch import ForwardBatch
from headway.runtime.llm.models.layers import Linear
from headway.runtime.llm.runner import ModelRunner
from tests.conftest import running_server


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_close_and_four_times_smaller(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 64).to(dtype), torch.randn(96).to(dtype), torch.randn(2, 5, 64).to(dtype)
    ref = (x.float() @ w.float().t() + b.float())
    q = Linear(w, b, "int8")
    out = q(x)
    assert out.dtype == dtype and out.shape == (2, 5, 96)
    assert float((out.float() - ref).norm() / ref.norm()) < 0.02
    assert q.weight.dtype == torch.int8 and q.nbytes < 0.3 * Linear(w.float(), b.float()).nbytes
    q.int8_kernel = False  # the dequantizing path other devices take gives the same answer
    assert float((q(x).float() - out.float()).norm() / out.float().norm()) < 0.01
    with pytest.raises(ValueError, match="allowed are none, int8, fp8"):
        Linear(w, b, "int4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_is_close_and_a_quarter_of_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 64).to(dtype), torch.randn(96).to(dtype), torch.randn(2, 5, 64).to(dtype)
    ref = (x.float() @ w.float().t() + b.float())
    q = Linear(w, b, "fp8")
    assert q.weight.dtype == torch.float8_e4m3fn and not q.fp8_kernel       # no fp8 matmul on a CPU
    out = q(x)
    assert out.dtype == dtype and out.shape == (2, 5, 96)
    assert float((out.float() - ref).norm() / ref.norm()) < 0.06           # e4m3: 3 mantissa bits
    assert q.nbytes < 0.3 * Linear(w.float(), b.float()).nbytes
    # the per-channel scale is what keeps small rows exact enough: scale one row down 1000x
    w2 = w.clone()
    w2[0] *= 1e-3
    q2 = Linear(w2, None, "fp8")
    row = (x.float() @ w2.float().t())[..., 0]
    assert float((q2(x).float()[..., 0] - row).norm() / row.norm()) < 0.06


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_linear_on_a_gpu_matches_the_weight_only_path() -> None:
    from headway.runtime.llm.models.layers import fp8_matmul_available

    torch.manual_seed(0)
    dev = torch.device("cuda")
    w, x = torch.randn(256, 128, device=dev, dtype=torch.bfloat16), torch.randn(8, 128, device=dev, dtype=torch.bfloat16)
    q = Linear(w, None, "fp8")
    assert q.fp8_kernel == fp8_matmul_available(dev)
    ref = x.float() @ w.float().t()
    out = q(x)
    assert float((out.float() - ref).norm() / ref.norm()) < 0.08


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_model_stays_close_to_the_original(tmp_path: Path, scheme: str) -> None:
    from tests.test_llm_models import _configs, _save_random

    _save_random(_configs()["llama"], tmp_path)
    ids = [random.Random(3).randrange(128) for _ in range(20)]
    batch = ForwardBatch.build([ids], [list(range(20))], all_logits=True)
    full = ModelRunner(tmp_path, num_slots=32).forward(batch)
    quant = ModelRunner(tmp_path, num_slots=32, quantization=scheme)
    qkv = quant.model.layers[0].qkv
    assert quant.quantization == scheme and (qkv.quantized if scheme == "int8" else qkv.fp8)
    lm_head = quant.model.lm_head
    assert not isinstance(lm_head, Linear) or not (lm_head.quantized or lm_head.fp8)  # LM head unquantized
    q = quant.forward(batch)
    assert float((q - full).norm() / full.norm()) < (0.05 if scheme == "int8" else 0.12)
    assert (q.argmax(-1) == full.argmax(-1)).float().mean() >= 0.85


@pytest.mark.slow
def test_server_reports_quantization_and_answers(tmp_path: Path) -> None:
    with running_server(["serve", "tinycoder-test", "--threads", "1", "--quantization", "int8", "--dtype", "float32"],
                        tmp_path) as s:
        state = httpx.get(f"{s.url}/headway/state").json()
        assert state["quantization"] == "int8" and state["dtype"] == "float32"  # --dtype is honoured
        r = httpx.post(f"{s.url}/v1/completions", json={"model": "tinycoder-test", "prompt": "def f(", "max_tokens": 4,
                                                         "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert "quantization=int8" in s.log()


@pytest.mark.slow
def test_eval_ppl_on_smollm2(tmp_path: Path) -> None:
    from headway.cli.main import app

    out = tmp_path / "ppl.json"
    res = CliRunner().invoke(app, ["eval", "ppl", "smollm2-135m-instruct", "--max-tokens", "256", "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["tokens"] == 256 and 1 < report["none"]["perplexity"] < 100  # real English, a real model
    assert abs(report["perplexity_change"]) < 0.05 and report["memory_ratio"] < 0.3
    assert report["none"]["decode_step_ms"] > 0 and report["int8"]["prefill_tokens_per_s"] > 0
    bad = CliRunner().invoke(app, ["eval", "ppl", "smollm2-135m-instruct", "--quantization", "fp4"])
    assert bad.exit_code == 2 and "allowed: int8, fp8" in bad.output
