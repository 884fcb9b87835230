"""Multinomial naive Bayes over word counts, trained in load() from the bundled data file."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

TOKEN = re.compile(r"[a-z']+")


class Inputs(BaseModel):
    texts: list[str] = Field(..., min_length=1, max_length=256, description="Texts to classify.")


class Model:
    def __init__(self, data_dir: Path | None = None, **_: object):
        self.data_dir = data_dir or Path(__file__).parent / "data"

    def load(self) -> None:
        examples = json.loads((self.data_dir / "train.json").read_text())
        vocab: dict[str, int] = {}
        for ex in examples:
            for tok in TOKEN.findall(ex["text"].lower()):
                vocab.setdefault(tok, len(vocab))
        self.labels = sorted({ex["label"] for ex in examples})
        counts = np.ones((len(self.labels), len(vocab)))  # Laplace smoothing
        priors = np.zeros(len(self.labels))
        for ex in examples:
            row = self.labels.index(ex["label"])
            priors[row] += 1
            for tok in TOKEN.findall(ex["text"].lower()):
                counts[row, vocab[tok]] += 1
        self.vocab = vocab
        self.log_likelihood = np.log(counts / counts.sum(axis=1, keepdims=True))
        self.log_prior = np.log(priors / priors.sum())

    def predict(self, inputs: Inputs) -> dict:
        results = []
        for text in inputs.texts:
            x = np.zeros(len(self.vocab))
            for tok in TOKEN.findall(text.lower()):
                if tok in self.vocab:
                    x[self.vocab[tok]] += 1
            scores = self.log_prior + self.log_likelihood @ x
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            best = int(np.argmax(probs))
            results.append({"label": self.labels[best],
                            "probabilities": {l: round(float(p), 4) for l, p in zip(self.labels, probs)}})
        return {"predictions": results}
