"""Speculative decoding as a user turns it on: headway.yaml `engine.speculative` validated
with actionable errors, and `headway serve --speculative ngram` logging it, reporting it on
/headway/state and exporting its counters on /metrics."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from headway.package.load import PackageError, validate_config
from tests.conftest import running_server, write_package


def test_engine_speculative_config_is_validated() -> None:
    cfg = validate_config({"name": "m", "runtime": "llm", "model": {"source": "tinycoder-test"},
                           "engine": {"speculative": "ngram"}})
    spec = cfg.engine_options().speculative
    assert spec is not None and spec.method == "ngram" and spec.num_tokens == 8
    cfg = validate_config({"name": "m", "runtime": "llm", "model": {"source": "x"},
                           "engine": {"speculative": {"method": "draft", "draft_layers": 4, "max_batch": 2}}})
    assert cfg.engine_options().speculative.draft_layers == 4
    for bad, fragment in (({"method": "draft"}, "draft_layers"), ({"method": "medusa"}, "ngram"),
                          ({"num_tokens": 0}, "num_tokens"), ({"ngram_min": 5, "ngram_max": 2}, "ngram_min")):
        with pytest.raises(PackageError) as err:
            validate_config({"name": "m", "runtime": "llm", "model": {"source": "x"},
                             "engine": {"speculative": bad}})
        assert fragment in str(err.value) and "speculative" in str(err.value)


@pytest.mark.slow  # starts two servers (~10 s)
def test_serve_flag_package_state_and_metrics(tmp_path) -> None:
    with running_server(["serve", "tinycoder-test", "--threads", "1", "--speculative", "ngram"], tmp_path) as s:
        state = httpx.get(f"{s.url}/headway/state").json()
        assert state["speculative"]["method"] == "ngram" and state["speculative"]["num_tokens"] == 8
        assert "speculative decoding: ngram" in s.log()
    # tinycoder's random weights never repeat the prompt, so a draft (its own first layer)
    # is what proposes here
    pkg = write_package(tmp_path / "pkg", "name: tiny-spec\nruntime: llm\nmodel:\n  source: tinycoder-test\n"
                        "engine:\n  num_threads: 1\n  speculative:\n    method: draft\n    draft_layers: 1\n",
                        None)
    with running_server(["serve", str(pkg)], tmp_path) as s:
        c = OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.completions.create(model="tiny-spec", prompt="def add(a, b):", max_tokens=24, temperature=0)
        assert r.usage.completion_tokens == 24
        spec = httpx.get(f"{s.url}/headway/state").json()["speculative"]
        assert spec["method"] == "draft" and spec["proposed_tokens"] > 0
        metrics = httpx.get(f"{s.url}/metrics").text
        for name in ("headway_llm_spec_proposed_tokens_total", "headway_llm_spec_accepted_tokens_total",
                     "headway_llm_spec_acceptance_rate", "headway_llm_spec_mean_accepted_length"):
            assert name in metrics
        proposed = [ln for ln in metrics.splitlines() if ln.startswith("headway_llm_spec_proposed_tokens_total")]
        assert float(proposed[0].split()[-1]) == spec["proposed_tokens"]
        assert "speculative decoding: draft (target, first 1 layers" in s.log()
