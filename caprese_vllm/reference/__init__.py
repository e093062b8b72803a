"""Plain PyTorch / transformers reference implementation of Caprese: the ground truth for fast paths."""

from caprese_vllm.reference.patch import CapreseMLP, patch_model, teacher_forcing, unpatch_model

__all__ = ["CapreseMLP", "patch_model", "teacher_forcing", "unpatch_model"]
