"""Baselines measured in the same run as the target: HF transformers ``generate`` and llama.cpp.

Owns (a) an in-process Hugging Face transformers runner that replays a workload request by
request or in padded batches of the workload's concurrency, recording the same per-request
metrics as the HTTP client (TTFT = time to the first generated token, taken from a streamer
that ``generate`` calls after every decoding step); and (b) the lifecycle of a llama.cpp server
(llama-cpp-python's OpenAI-compatible server) started as a subprocess on 127.0.0.1.

In-process baselines run closed loop: Poisson arrival times are not honoured (the JSON says so).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Literal, cast

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from headway.bench.client import ProgressFn, RequestResult, RunResult
from headway.bench.workloads import Session, Workload, build_messages, render_prompt
from headway.runtime.host import cpu_share

HFMode = Literal["sequential", "batched"]




class _StepClock(BaseStreamer):
    """Records the wall time and the tokens of every decoding step of one ``generate`` call."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.times: list[float] = []
        self.tokens: list[list[int]] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt ids
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.tokens.append(value.reshape(-1).tolist())

    def end(self) -> None:
        return None


class TransformersBaseline:
    """HF transformers ``generate`` on a model dir or a GGUF file, greedy decoding."""

    def __init__(self, *, model_dir: str | Path | None = None, gguf: str | Path | None = None,
                 device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if (model_dir is None) == (gguf is None):
            raise ValueError("give exactly one of model_dir (a Hugging Face model directory) or gguf (a .gguf file)")
        if gguf is not None:
            path = Path(gguf)
            if not path.is_file():
                raise FileNotFoundError(f"GGUF file not found: {path}")
            kwargs: dict[str, object] = {"gguf_file": path.name}
            where = path.parent
        else:
            where = Path(model_dir)  # type: ignore[arg-type]
            if not (where / "config.json").is_file():
                raise FileNotFoundError(f"not a Hugging Face model directory (no config.json): {where}")
            kwargs = {}
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        # transformers types PreTrainedModel.to through a wrapper whose signature mypy misreads
        self.model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs).to(self.device).eval()  # type: ignore[arg-type]
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.eos_ids = self._eos_ids()
        self.ignore_eos = False  # set by the caller for fixed-length outputs
        self.source = str(gguf or model_dir)

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()

    def _prompt(self, messages: list[dict[str, str]], api: str) -> str:
        if api == "chat" and self.tokenizer.chat_template:
            return str(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return render_prompt(messages)

    def _generate(self, prompts: list[str], max_tokens: list[int], api: str) -> tuple[list[RequestResult], list[str]]:
        """One ``generate`` call over ``prompts``; per-row results with times relative to its start."""
        t0 = time.perf_counter()  # like a server's TTFT, this includes tokenizing the prompt
        templated = api == "chat" and bool(self.tokenizer.chat_template)
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not templated)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        clock = _StepClock()
        with torch.inference_mode():
            self.model.generate(**enc, max_new_tokens=max(max_tokens), do_sample=False, streamer=clock,
                                min_new_tokens=max(max_tokens) if self.ignore_eos else None,
                                pad_token_id=self.tokenizer.pad_token_id)
        results, answers = [], []
        for row, limit in enumerate(max_tokens):
            ids: list[int] = []
            times: list[float] = []
            for step_time, step_tokens in zip(clock.times, clock.tokens):
                eos = step_tokens[row] in self.eos_ids and not self.ignore_eos
                if len(ids) >= limit or eos:
                    if eos and len(ids) < limit:
                        times.append(step_time)  # the EOS step ends the request
                    break
                ids.append(step_tokens[row])
                times.append(step_time)
            token_times = times[: len(ids)]
            r = RequestResult(session=0, turn=0, ok=True, start_s=0.0, output_tokens=len(ids),
                              prompt_tokens=int(enc["attention_mask"][row].sum()), status=None)
            r.ttft_s = token_times[0] - t0 if token_times else None
            r.itl_s = [b - a for a, b in zip(token_times, token_times[1:])]
            r.e2e_s = (times[-1] if times else time.perf_counter()) - t0
            r.text = cast(str, self.tokenizer.decode(ids, skip_special_tokens=True))  # one sequence: one str
            results.append(r)
            answers.append(r.text)
        return results, answers

    def warmup(self, batch: int, api: str = "chat") -> float:
        """One untimed short ``generate`` at ``batch`` rows (the first call pays one-off setup
        costs, seconds on CPU); returns its duration."""
        t0 = time.perf_counter()
        prompt = self._prompt([{"role": "user", "content": "Say hello."}], api)
        self._generate([prompt] * batch, [4] * batch, api)
        return time.perf_counter() - t0

    def run(self, workload: Workload, *, api: str = "chat", mode: HFMode = "sequential",
            duration_limit_s: float = 600.0, progress: ProgressFn | None = None, warmup: bool = True) -> RunResult:
        """Replay ``workload``: one request at a time, or padded batches of ``workload.concurrency``."""
        if mode not in ("sequential", "batched"):
            raise ValueError(f"mode must be 'sequential' or 'batched', got {mode!r}")
        batch = 1 if mode == "sequential" else workload.concurrency
        warmup_s = self.warmup(batch, api) if warmup else None
        sessions = list(workload.sessions)
        out: list[RequestResult] = []
        run_start = time.perf_counter()
        for i in range(0, len(sessions), batch):
            group = sessions[i : i + batch]
            answers: dict[int, list[str]] = {s.id: [] for s in group}
            for k in range(max(len(s.turns) for s in group)):
                live = [s for s in group if k < len(s.turns)]
                if time.perf_counter() - run_start > duration_limit_s:
                    out.extend(_skipped(live, k, f"cancelled: duration limit {duration_limit_s:g}s reached",
                                        time.perf_counter() - run_start))
                    continue
                prompts = [self._prompt(build_messages(s, k, answers[s.id]), api) for s in live]
                started = time.perf_counter() - run_start
                rows, texts = self._generate(prompts, [s.turns[k].max_tokens for s in live], api)
                for s, r, text in zip(live, rows, texts):
                    r.session, r.turn, r.start_s = s.id, k, started
                    answers[s.id].append(text)
                    out.append(r)
                    if progress is not None:
                        progress(r)
        order = {(s.id, k): n for n, (s, k) in enumerate((s, k) for s in sessions for k in range(len(s.turns)))}
        out.sort(key=lambda r: order[(r.session, r.turn)])
        return RunResult(target=f"transformers-{mode}", results=out, wall_s=time.perf_counter() - run_start,
                         meta={"engine": "transformers.generate", "mode": mode, "batch_size": batch,
                               "model": self.source, "device": str(self.device), "warmup_s": warmup_s,
                               "schedule": "closed loop (arrival times not honoured)"})


def _skipped(sessions: list[Session], turn: int, why: str, at: float) -> list[RequestResult]:
    return [RequestResult(session=s.id, turn=turn, ok=False, start_s=at, error=why) for s in sessions]


LLAMA_PYTHON_ENV = "HEADWAY_LLAMA_CPP_PYTHON"


def llama_cpp_python() -> str:
    """The interpreter that runs llama.cpp's server: $HEADWAY_LLAMA_CPP_PYTHON (a separate venv,
    e.g. a build without AMX where the CPU faults on it), else this one."""
    return os.environ.get(LLAMA_PYTHON_ENV) or sys.executable


def llama_cpp_available() -> str | None:
    """None when llama-cpp-python's server can run here, else why not."""
    if llama_cpp_python() != sys.executable:
        probe = subprocess.run([llama_cpp_python(), "-c", "import llama_cpp.server"], capture_output=True, text=True)
        return None if probe.returncode == 0 else f"{llama_cpp_python()} cannot import llama_cpp.server: {probe.stderr[-300:]}"
    for module in ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            return f"python module {module!r} is not installed (pip install 'llama-cpp-python[server]')"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaCppServer:
    """llama-cpp-python's OpenAI-compatible server on a GGUF, as a subprocess on 127.0.0.1.

    llama-cpp-python's server has no parallel slots: it decodes one request at a time (the
    others wait on its lock), so ``parallel_slots`` is always 1. Threads come from the CPU share.
    """

    model_alias = "llama.cpp"

    def __init__(self, gguf: str | Path, *, threads: int | None = None, n_ctx: int = 4096,
                 port: int | None = None, startup_timeout_s: float = 120.0, log_path: str | Path | None = None) -> None:
        self.gguf = Path(gguf)
        if not self.gguf.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.gguf}")
        why = llama_cpp_available()
        if why is not None:
            raise RuntimeError(f"cannot start llama.cpp server: {why}")
        self.threads = threads or cpu_share()
        self.n_ctx = n_ctx
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.parallel_slots = 1

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def meta(self) -> dict[str, object]:
        return {"engine": "llama-cpp-python server", "gguf": str(self.gguf), "threads": self.threads,
                "n_ctx": self.n_ctx, "parallel_slots": self.parallel_slots}

    def start(self) -> LlamaCppServer:
        cmd = [llama_cpp_python(), "-m", "llama_cpp.server", "--model", str(self.gguf), "--model_alias",
               self.model_alias, "--host", "127.0.0.1", "--port", str(self.port), "--n_threads",
               str(self.threads), "--n_threads_batch", str(self.threads), "--n_ctx", str(self.n_ctx),
               # its default cuts off the streaming request whenever another arrives: queue them
               "--interrupt_requests", "False"]
        if self.proc is not None:
            raise RuntimeError(f"llama.cpp server already started on {self.base_url}")
        self._log = open(self.log_path, "wb") if self.log_path else None  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"llama.cpp server exited with code {code} during startup "
                                   f"(command: {' '.join(cmd)}; log: {self.log_path or 'not kept'})")
            try:
                if httpx.get(self.base_url + "/v1/models", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"llama.cpp server not ready after {self.startup_timeout_s:g}s on {self.base_url}")

    def stop(self) -> None:
        """Terminate the server (kill after 10 s) and close its log; safe to call twice."""
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def exit_code(self) -> int | None:
        """The server's exit code if it died (e.g. -11 for a segfault), None while it runs."""
        return None if self.proc is None else self.proc.poll()

    def __enter__(self) -> LlamaCppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
