"""A replica's tokenizer files rebuild the same tokenizer at the router (exact prefix routing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from headway.library import resolve
from headway.runtime.llm.tokenizer import TOKENIZER_FILES, ModelTokenizer


def test_tokenizer_files_round_trip(tmp_path: Path) -> None:
    src = ModelTokenizer(resolve("smollm2-135m-instruct", install=False, progress=False).path)
    files = src.files()
    assert "tokenizer.json" in files and set(files) <= set(TOKENIZER_FILES)
    copy = ModelTokenizer.from_files(files, tmp_path / "tok")
    messages = [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello there!"}]
    assert copy.encode_chat(messages, add_generation_prompt=True) == src.encode_chat(messages, add_generation_prompt=True)
    assert copy.encode("def f(x): return x") == src.encode("def f(x): return x")
    assert copy.eos_token_ids == src.eos_token_ids
    with pytest.raises(ValueError, match="not a tokenizer file: '../evil'"):
        ModelTokenizer.from_files({"../evil": "x"}, tmp_path / "bad")
    assert not (tmp_path / "evil").exists()
