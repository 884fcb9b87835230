"""The deployment spec: what to serve, how many replicas, how they scale and what they need.

A YAML file validated like headway.yaml (every error at once, each with the field, the reason and
a corrected example); `json_schema()` exports its schema.

    name: chat
    package: smollm2-135m-instruct      # a model-library name or a model package directory
    replicas: {min: 0, max: 4}
    autoscaling: {target_concurrency: 8, target_utilization: 0.7, window_s: 60, scale_down_delay_s: 30}
    resources: {cpu: 1}
    env:
      LOG_LEVEL: info                              # a plain value
      HF_TOKEN: {secret: true, value: "hf_..."}    # a secret: "***" in every status answer and log line

Secrets reach the replica's environment and nothing else: `public_dump()` is the spec as every
status path shows it, and `redact(text)` masks the values in any text (log tails, errors).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from headway.infra.autoscale.policy import POLICIES as AUTOSCALE_POLICY_TYPES
from headway.infra.autoscale.types import AutoscaleConfig
from headway.infra.router.policies import POLICIES
from headway.package.load import FieldError, PackageError, _errors_from
from headway.package.schema import _Strict

SPEC = "the deployment spec"
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
MASK = "***"
# variables that make an interpreter or the dynamic linker run code from elsewhere: a spec must not set them
_CODE_ENV = re.compile(r"^(LD_.*|DYLD_.*|PYTHON(PATH|HOME|STARTUP|USERBASE|EXECUTABLE|INSPECT|PLATLIBDIR|"
                       r"BREAKPOINT|SAFEPATH)|PATH|BASH_ENV|ENV|HEADWAY_CACHE|VIRTUAL_ENV|PIP_.*)$")
_CODE_ARGS = ("--lora-root", "--secrets-dir")


class Replicas(_Strict):
    min: int = Field(1, ge=0, le=10_000, description="Replicas kept however idle (0: scale to zero).", examples=[0])
    max: int = Field(4, ge=1, le=10_000, description="Replicas at most.", examples=[8])


class LatencyObjective(_Strict):
    ttft_p95_s: float = Field(..., gt=0, description="p95 time to first byte through the router, in seconds; above it "
                              "the deployment grows.", examples=[1.0])


class Autoscaling(_Strict):
    policy: str = Field("headway", description="Autoscaling policy: headway (startup-aware, the default), "
                        "knative-kpa or ray-serve (the baselines).", examples=["headway"])
    target_concurrency: float = Field(8.0, gt=0, description="Requests in flight one replica is sized for.", examples=[8])
    target_utilization: float = Field(0.7, gt=0, le=1, description="Fraction of target_concurrency planned for.",
                                      examples=[0.7])
    window_s: float = Field(60.0, gt=0, description="Stable window of the concurrency average, seconds.", examples=[60])
    panic_window_s: float = Field(6.0, gt=0, description="Short window that reacts to bursts, seconds.", examples=[6])
    scale_down_delay_s: float = Field(30.0, ge=0, description="How long a lower recommendation must hold before "
                                      "replicas go, seconds.", examples=[30])
    startup_s: float = Field(10.0, ge=0, description="Startup time assumed until one is measured, seconds.", examples=[5])
    tick_s: float = Field(1.0, gt=0, le=60, description="How often the autoscaler decides, seconds.", examples=[1])
    latency_objective: LatencyObjective | None = Field(None, description="Optional latency objective.",
                                                       examples=[{"ttft_p95_s": 1.0}])

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        if v not in AUTOSCALE_POLICIES:
            raise ValueError(f"unknown autoscaling policy '{v}'; choose one of: {', '.join(AUTOSCALE_POLICIES)}")
        return v


AUTOSCALE_POLICIES = tuple(AUTOSCALE_POLICY_TYPES)


class DeploymentResources(_Strict):
    cpu: float = Field(1.0, gt=0, description="CPU cores one replica uses (also sizes its threads).", examples=[1])
    gpu: float = Field(0, ge=0, description="GPUs one replica needs (Ray provider).", examples=[1])
    memory_gb: float | None = Field(None, gt=0, description="Memory one replica needs, GiB (Ray provider).",
                                    examples=[2])
    custom: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources one replica needs, e.g. "
                                     "a region label a node advertises.", examples=[{"region-eu": 1}])


class Activator(_Strict):
    queue_size: int = Field(1000, ge=1, le=1_000_000, description="Requests that may wait for a replica at once.",
                            examples=[1000])
    timeout_s: float = Field(120.0, gt=0, description="How long a request waits for a replica before a 503.",
                             examples=[60])


class Drain(_Strict):
    timeout_s: float = Field(60.0, ge=0, description="How long a replica being removed may take to finish its "
                             "requests before it is stopped anyway.", examples=[60])


class SecretEnv(_Strict):
    """An environment value the replica gets but no status answer, log line or error shows."""

    secret: Literal[True] = Field(True, description="Always true: the value is shown as \"***\".", examples=[True])
    value: str = Field(..., repr=False, description="The value.", examples=["hf_xxx"])


class DeploymentSpec(_Strict):
    name: str = Field(..., description="Deployment name: the `model` clients ask for.", examples=["chat"])
    package: str = Field(..., description="A model-library name or a model package directory.",
                         examples=["smollm2-135m-instruct"])
    replicas: Replicas = Field(default_factory=Replicas)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    resources: DeploymentResources = Field(default_factory=DeploymentResources)
    activator: Activator = Field(default_factory=Activator)
    drain: Drain = Field(default_factory=Drain)
    router_policy: str | None = Field(None, description="Routing policy (default: predicted-latency for LLMs).",
                                      examples=["predicted-latency"])
    serve_args: list[str] = Field(default_factory=list, description="Extra `headway serve` options for each replica.",
                                  examples=[["--quantization", "int8"]])
    env: dict[str, str | SecretEnv] = Field(
        default_factory=dict, description="Environment of each replica: NAME: value, or NAME: {secret: true, value: "
        "...} for a value that no status answer, log line or error message shows (\"***\" instead).",
        examples=[{"LOG_LEVEL": "info", "HF_TOKEN": {"secret": True, "value": "hf_xxx"}}])

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str | SecretEnv]) -> dict[str, str | SecretEnv]:
        bad = sorted(k for k in v if _CODE_ENV.match(k))
        if bad:
            raise ValueError(f"{', '.join(bad)} cannot be set by a deployment spec: such variables make the replica "
                             "run code or use files from elsewhere; set them where the control plane starts, or "
                             "put the code in a package under an allowed --package-root")
        return v

    @field_validator("serve_args")
    @classmethod
    def _serve_args(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a.split("=", 1)[0] in _CODE_ARGS]
        if bad:
            raise ValueError(f"{bad[0]} cannot be set by a deployment spec (it widens what a replica loads); put "
                             "engine.lora_roots in the package's headway.yaml, e.g. serve_args: [--quantization, int8]")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"'{v}' is not a deployment name: use 1-63 lowercase letters, digits, '.' or '-', "
                             "starting and ending with a letter or digit")
        return v

    @field_validator("router_policy")
    @classmethod
    def _router_policy(cls, v: str | None) -> str | None:
        if v is not None and v not in POLICIES:
            raise ValueError(f"unknown routing policy '{v}'; choose one of: {', '.join(POLICIES)}")
        return v

    @model_validator(mode="after")
    def _cross(self) -> DeploymentSpec:
        if self.replicas.min > self.replicas.max:
            raise ValueError(f"replicas.min ({self.replicas.min}) is above replicas.max ({self.replicas.max})")
        if self.autoscaling.panic_window_s > self.autoscaling.window_s:
            raise ValueError(f"autoscaling.panic_window_s ({self.autoscaling.panic_window_s}) is longer than "
                             f"autoscaling.window_s ({self.autoscaling.window_s})")
        return self

    def autoscale_config(self) -> AutoscaleConfig:
        a = self.autoscaling
        return AutoscaleConfig(
            min_replicas=self.replicas.min, max_replicas=self.replicas.max, target_concurrency=a.target_concurrency,
            target_utilization=a.target_utilization, window_s=a.window_s, panic_window_s=a.panic_window_s,
            scale_down_delay_s=a.scale_down_delay_s, startup_s=a.startup_s,
            latency_objective_s=a.latency_objective.ttft_p95_s if a.latency_objective else None)

    def env_values(self) -> dict[str, str]:
        """The replica's environment additions, secrets included (for providers only)."""
        return {k: v.value if isinstance(v, SecretEnv) else v for k, v in self.env.items()}

    def secrets(self) -> list[str]:
        return [v.value for v in self.env.values() if isinstance(v, SecretEnv) and v.value]

    def public_dump(self) -> dict[str, Any]:
        """The spec as every status answer and log shows it: secret values are "***"."""
        data = self.model_dump(mode="json")
        data["env"] = {k: {"secret": True, "value": MASK} if isinstance(v, SecretEnv) else v
                       for k, v in self.env.items()}
        return data

    def redact(self, text: str) -> str:
        """`text` with every secret value of this spec replaced by "***"."""
        return redact(text, self.secrets())

    def resolved(self, base: Path) -> DeploymentSpec:
        """The spec with a relative package directory made absolute against `base` (the spec's folder),
        so the control plane can start replicas from anywhere."""
        p = (base / os.path.expanduser(self.package))
        if p.is_dir() or p.name == "headway.yaml":
            return self.model_copy(update={"package": str(p.resolve())})
        return self


def redact(text: str, secrets: list[str]) -> str:
    """`text` with each of `secrets` replaced by "***" (longest first, so one inside another goes too)."""
    for value in sorted(set(secrets), key=len, reverse=True):
        if value:
            text = text.replace(value, MASK)
    return text


def validate_spec(data: Any, path: Path | str = "deployment.yaml") -> DeploymentSpec:
    """Validate parsed spec data; raise PackageError listing every problem."""
    if not isinstance(data, dict):
        raise PackageError(path, [FieldError("(file)", f"expected a mapping of fields, got {type(data).__name__}",
                                             "name: chat")], SPEC)
    try:
        return DeploymentSpec.model_validate(data)
    except ValidationError as exc:
        errors = _errors_from(exc, DeploymentSpec)
        raise PackageError(path, errors, SPEC) from None


def load_spec(path: str | os.PathLike[str]) -> DeploymentSpec:
    p = Path(path)
    if not p.is_file():
        raise PackageError(p, [FieldError("(path)", "no such file", "headway deploy ./chat.yaml")], SPEC)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PackageError(p, [FieldError("(yaml)", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}",
                                          "name: chat")], SPEC) from None
    return validate_spec(data, p).resolved(p.parent)


def json_schema() -> dict[str, Any]:
    return DeploymentSpec.model_json_schema()
