"""Write the deployment spec's JSON schema next to this module: `python -m headway.infra.fleet.export_schema`
(editors validate spec files with it)."""

from __future__ import annotations

import json
from pathlib import Path

from headway.infra.fleet.spec import json_schema

SCHEMA_PATH = Path(__file__).with_name("deployment.schema.json")

if __name__ == "__main__":
    SCHEMA_PATH.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {SCHEMA_PATH}")
