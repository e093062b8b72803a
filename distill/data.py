"""Samples on disk (JSON lines) and as padded teacher-forcing batches.

A sample is one prompt and the dense model's answer, both as token ids, so that fitting and
evaluation score exactly the tokens the model produced (no re-tokenisation drift).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict


class Sample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    kind: str                 # "math" | "language"
    topic: str
    question: str
    answer: str | None        # exact answer (math), None (language)
    prompt_ids: list[int]
    completion_ids: list[int] = []
    text: str = ""
    finish_reason: str = ""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def prompt_ids_for(tokenizer, question: str) -> list[int]:
    """The chat template's user turn for instruct models; a plain Q/A frame for base models."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(f"Question: {question}\nAnswer:").input_ids


def read_samples(path: Path) -> list[Sample]:
    if not path.exists():
        return []
    samples = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                samples.append(Sample.model_validate_json(line))
            except ValueError as err:
                # a crash mid-write leaves at most a torn last line; anything else is corruption
                if f.readline() == "":
                    break
                raise ValueError(f"{path}:{line_no}: not a sample ({str(err).splitlines()[0]}); delete the "
                                 "file to regenerate it") from None
    return samples


def append_samples(path: Path, samples: Iterable[Sample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for sample in samples:
            f.write(sample.model_dump_json() + "\n")
        f.flush()


@dataclass
class TokenBatch:
    input_ids: torch.Tensor        # [B, S] right-padded
    attention_mask: torch.Tensor   # [B, S] 1 on real tokens
    prompt_mask: torch.Tensor      # [B, S] bool: prompt tokens (dense FF, method statistics)
    # [B, S] bool: positions that run compressed and predict a next completion token (the logits at the
    # last prompt token come from the dense prefill, so they are not scored)
    target_mask: torch.Tensor
    samples: list[Sample]

    @property
    def completion_mask(self) -> torch.Tensor:  # [B, S] bool: completion tokens (compressed FF)
        return self.attention_mask.bool() & ~self.prompt_mask


def length_batches(samples: list[Sample], max_tokens: int, max_seqs: int | None = None) -> Iterator[list[Sample]]:
    """Samples grouped by length (little padding), about `max_tokens` padded tokens per batch."""
    ordered = sorted(samples, key=lambda s: s.num_tokens)
    batch: list[Sample] = []
    for sample in ordered:
        longest = max([s.num_tokens for s in batch] + [sample.num_tokens])
        if batch and (longest * (len(batch) + 1) > max_tokens or (max_seqs and len(batch) >= max_seqs)):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


def collate(samples: list[Sample], pad_id: int, device: str | torch.device = "cpu") -> TokenBatch:
    length = max(s.num_tokens for s in samples)
    n = len(samples)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention = torch.zeros(n, length, dtype=torch.long)
    prompt = torch.zeros(n, length, dtype=torch.bool)
    target = torch.zeros(n, length, dtype=torch.bool)
    for row, s in enumerate(samples):
        p, total = len(s.prompt_ids), s.num_tokens
        input_ids[row, :total] = torch.tensor(s.prompt_ids + s.completion_ids)
        attention[row, :total] = 1
        prompt[row, :p] = True
        target[row, p:total - 1] = True  # logits at i predict token i + 1
    return TokenBatch(input_ids.to(device), attention.to(device), prompt.to(device), target.to(device), samples)
