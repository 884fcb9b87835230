"""Multi-LoRA on SmolLM2-135M-Instruct (slow): greedy tokens of a random adapter equal a
Hugging Face model with the adapter merged, a batch mixing the base and two adapters gives each
request its tokens alone, and an adapter trained a few steps in the test changes what a real
replica answers through the official `openai` client."""

from __future__ import annotations

import pytest
from openai import OpenAI

from headway.library import resolve
from headway.runtime.llm.config import ModelConfig
from headway.runtime.llm.engine import LLMEngine
from headway.runtime.llm.lora.peft import random_adapter
from tests.conftest import running_server
from tests.lora_reference import hf_greedy, hf_model
from tests.lora_training import train_adapter
from tests.test_lora import run_all

SMOL = "smollm2-135m-instruct"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_dir():
    return resolve(SMOL).path


def test_greedy_matches_merged_reference_and_mixed_batch(tmp_path, smol_dir) -> None:
    cfg = ModelConfig.from_model_dir(smol_dir)
    ads = {"r8": random_adapter(tmp_path / "r8", cfg, r=8, seed=1, std=0.05),
           "r16": random_adapter(tmp_path / "r16", cfg, r=16, lora_alpha=8, seed=2, std=0.05,
                                 target_modules=["q_proj", "v_proj", "up_proj"])}
    engine = LLMEngine.launch(smol_dir, dtype="float32", lora_adapters={k: str(v) for k, v in ads.items()},
                              kv_cache_tokens=2048)
    try:
        prompt = engine.tokenizer.encode("The three primary colors are")
        jobs = [(prompt, None), (prompt, "r8"), (prompt, "r16")]
        alone = [run_all(engine, [job], max_tokens=16)[0] for job in jobs]
        mixed = run_all(engine, jobs, max_tokens=16)
    finally:
        engine.stop()
    assert mixed == alone
    assert len({tuple(t) for t in alone}) == 3  # each adapter changes the output
    for (ids, name), got in zip(jobs[1:], alone[1:]):  # the base model's own reference: test_llm_models
        assert got == hf_greedy(hf_model(smol_dir, ads[name]), ids, 16), name


def test_trained_adapter_changes_the_answer_through_the_server(tmp_path, smol_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    fit = train_adapter(smol_dir, tmp_path / "pw", tok.encode("The secret password is pineapple."))
    assert fit["loss"] < 0.5, fit
    with running_server(["serve", SMOL, "--dtype", "float32", "--lora", f"pw={tmp_path / 'pw'}"], tmp_path,
                        timeout=300) as s:
        c = OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(model: str):
            return c.completions.create(model=model, prompt="The secret password is", max_tokens=6, temperature=0,
                                        logprobs=1)

        tuned, base = ask("pw"), ask(SMOL)
    assert "pineapple" in tuned.choices[0].text, tuned.choices[0].text
    assert "pineapple" not in base.choices[0].text
    # the adapter's first token is near-certain; the base model's own first choice is much less so
    assert tuned.choices[0].logprobs.token_logprobs[0] > base.choices[0].logprobs.token_logprobs[0] + 0.5
