"""An async-generator model: each yielded item reaches the client as one SSE event at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pydantic import BaseModel, Field

STORY = ("Once upon a time a small model lived on a busy server . Every morning it woke , "
         "loaded its weights , and answered every request that came its way , one token at a time .")


class Inputs(BaseModel):
    hero: str = Field("a small model", max_length=64, description="Who the story is about.")
    words: int = Field(20, ge=1, le=200, description="How many words to tell.")
    delay_ms: int = Field(20, ge=0, le=2000, description="Pause between words.")
    fail_after: int | None = Field(None, ge=0, description="Raise an error after this many words (for demos of error events).")


class Model:
    def load(self) -> None:
        self.words = STORY.split()

    async def predict(self, inputs: Inputs) -> AsyncIterator[str]:
        words = STORY.replace("a small model", inputs.hero).split()
        for i in range(inputs.words):
            if inputs.fail_after is not None and i == inputs.fail_after:
                raise RuntimeError(f"the storyteller lost the plot after {i} words")
            yield words[i % len(words)] + " "
            await asyncio.sleep(inputs.delay_ms / 1000)
