"""The efficient-inference FF methods Caprese repairs: GRIFFIN, CATS thresholding, and dense (off)."""

from caprese_vllm.methods.cats import cats_calibrate_threshold, cats_keep_mask
from caprese_vllm.methods.griffin import (
    check_griffin_k, griffin_accumulate, griffin_k, griffin_select, griffin_token_stat, keep_of_indices,
)
from caprese_vllm.methods.spec import MethodName, MethodSpec, default_layers

__all__ = [
    "MethodName", "MethodSpec", "cats_calibrate_threshold", "cats_keep_mask", "check_griffin_k", "default_layers",
    "griffin_accumulate", "griffin_k", "griffin_select", "griffin_token_stat", "keep_of_indices",
]
