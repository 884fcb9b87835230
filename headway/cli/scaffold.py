"""`headway init`: a model package that serves as-is."""

from __future__ import annotations

from pathlib import Path

HEADWAY_YAML = """\
# Headway model package. Schema: headway/package/headway.schema.json
name: {name}
runtime: custom
description: A starter model. Edit model.py, then `headway watch {path}` reloads on save.
model:
  class_name: Model
requirements: []          # pip specifiers, installed into this package's own venv, e.g. [numpy==2.1.0]
environment: {{}}          # variables set for the model, e.g. {{LOG_LEVEL: info}}
secrets: []               # names only; values come from env vars or $HEADWAY_SECRETS_DIR/NAME
resources:
  cpu: 1
  memory: 2Gi
runtime_options:
  predict_concurrency: 4  # requests run at once; up to queue_size more wait, then 429
  queue_size: 64
  max_request_body: 10MB
"""

MODEL_PY = '''\
"""A starter model: counts the words and characters of a text.

predict() may also be async, or a (async) generator to stream its output.
"""

from pydantic import BaseModel, Field


class Inputs(BaseModel):
    text: str = Field(..., min_length=1, description="Text to analyse.")


class Model:
    def __init__(self, config=None, secrets=None):
        self.secrets = secrets or {}

    def load(self) -> None:
        # Load weights here; /health/ready turns ready only after this returns.
        self.vocabulary = set()

    def predict(self, inputs: Inputs) -> dict:
        words = inputs.text.split()
        return {"words": len(words), "characters": len(inputs.text)}
'''


def scaffold(path: Path, name: str | None = None) -> list[Path]:
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; choose a new directory")
    path.mkdir(parents=True, exist_ok=True)
    name = name or path.name.lower().replace(" ", "-")
    files = {"headway.yaml": HEADWAY_YAML.format(name=name, path=path), "model.py": MODEL_PY}
    written = []
    for fname, text in files.items():
        (path / fname).write_text(text)
        written.append(path / fname)
    return written
