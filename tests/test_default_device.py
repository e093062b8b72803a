"""Engine-side code never depends on torch's default device or dtype (issue 16 deliverable 2a).

vLLM builds the model inside its own `torch.device(cuda)` / default-dtype context, and the plugin
fingerprints the checkpoint, loads the adapter and makes its buffers right then: a tensor that
follows the defaults lands on the GPU ("can't convert cuda:0 device type tensor to numpy" on an H200)
or in the wrong dtype. Here the defaults are set to the meta device (no data at all: any tensor that
follows them fails on use; on a CUDA host, to CUDA as well) and float16, around the same calls, which
must still give real CPU tensors and the values they give under the usual defaults. No model is
needed: a small checkpoint with the same tensor names is written here.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from caprese_vllm.adapter import BaseModelInfo, CapreseAdapter, synthetic_adapter
from caprese_vllm.adapter.fingerprint import ff_weight_name, fingerprint_checkpoint
from caprese_vllm.engine import ops  # noqa: F401
from caprese_vllm.engine.batch_state import CapreseBatchState
from caprese_vllm.engine.step_info import StepInfo
from caprese_vllm.methods import MethodSpec, griffin_select

CPU = torch.device("cpu")
AMBIENT = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])
HIDDEN, INTER, LAYERS = 64, 96, 3


@contextmanager
def ambient(device: str, how: str = "set_default_device", dtype: torch.dtype = torch.float16):
    """torch's default device and dtype set as vLLM sets them while it builds a model, restored after:
    `set_default_device` (process-wide) or a `with torch.device(...)` block (vLLM's model loader)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if how == "set_default_device":
            torch.set_default_device(device)
            try:
                yield
            finally:
                torch.set_default_device(None)
        else:
            with torch.device(device):
                yield
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Llama-named checkpoint (bf16, as the zoo's) with only the FF weights the fingerprint reads."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(LAYERS):
        for proj, shape in (("gate_proj", (INTER, HIDDEN)), ("up_proj", (INTER, HIDDEN)), ("down_proj", (HIDDEN, INTER))):
            tensors[ff_weight_name(layer, proj)] = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("model")
    save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def base(checkpoint):
    return BaseModelInfo(architecture="LlamaForCausalLM", hidden_size=HIDDEN, intermediate_size=INTER,
                         num_layers=LAYERS, fingerprint=fingerprint_checkpoint(checkpoint, LAYERS))


@pytest.mark.parametrize("device", AMBIENT)
@pytest.mark.parametrize("how", ["set_default_device", "device context"])
def test_fingerprint_of_a_checkpoint_ignores_the_default_device(checkpoint, base, device, how):
    with ambient(device, how):
        assert fingerprint_checkpoint(checkpoint, LAYERS) == base.fingerprint


@pytest.mark.parametrize("device", AMBIENT)
def test_adapter_loads_real_cpu_float32_tensors(base, tmp_path, device):
    method = MethodSpec(name="griffin", density=0.5, layers=[0, 2])
    saved = synthetic_adapter(base, method, rank=8, scale=0.5, seed=1).save(tmp_path / "adapter")
    expected = CapreseAdapter.load(saved)
    with ambient(device):
        loaded = CapreseAdapter.load(saved)
        loaded.check_dtype(torch.bfloat16)
        made = synthetic_adapter(base, method, rank=8, scale=0.5, seed=1)
    for layer in expected.lowrank_a:
        for got in (loaded.lowrank_a[layer], loaded.lowrank_b[layer], made.lowrank_a[layer], made.lowrank_b[layer]):
            assert got.device == CPU and got.dtype == torch.float32
        assert torch.equal(loaded.lowrank_a[layer], expected.lowrank_a[layer])
        assert torch.equal(made.lowrank_b[layer], expected.lowrank_b[layer])


@pytest.mark.parametrize("device", AMBIENT)
def test_batch_state_buffers_and_a_selection_step_follow_the_given_device(device):
    inter, k = 64, 16
    z = torch.rand(9, inter, generator=torch.Generator().manual_seed(0))
    with ambient(device):
        state = CapreseBatchState(max_slots=4, max_tokens=32, device=CPU, griffin_layers=1, intermediate_size=inter,
                                  griffin_k=k)
        layer = state.add_griffin_layer(inter, k, layer_idx=0)
        for req_ids, start, n in ((["a"], 0, 8), (["a"], 8, 1)):
            state.on_step(StepInfo(req_ids=req_ids, num_scheduled=np.array([n]), chunk_start=np.array([start]),
                                   prompt_len=np.array([8]), in_prefill=np.array([start < 8]), live_req_ids={"a"}))
            torch.ops.caprese.griffin_sparsify(z[start:start + n], state.token_slot[:n], state.token_stat[:n],
                                               state.token_dense[:n], layer.stat_sq, layer.neuron_idx)
        keep = state.enable_keep_mask()
    buffers = {"stat_sq": (state.stat_sq, torch.float32), "neuron_idx": (state.neuron_idx, torch.int64),
               "token_slot": (state.token_slot, torch.int64), "token_stat": (state.token_stat, torch.bool),
               "token_dense": (state.token_dense, torch.bool), "keep_mask": (keep, torch.uint8)}
    for name, (tensor, dtype) in buffers.items():
        assert tensor.device == CPU and tensor.dtype == dtype, (name, tensor.device, tensor.dtype)
    stat = (z[:8] / z[:8].norm(dim=-1, keepdim=True)).square().sum(0, keepdim=True)
    assert layer.neuron_idx[state.slot_of["a"]].tolist() == griffin_select(stat, k)[0].tolist()


@pytest.mark.parametrize("device", AMBIENT)
def test_kernel_workspaces_follow_the_given_device(device):
    pytest.importorskip("triton")
    from caprese_vllm.kernels.decode_mlp import decode_workspace

    with ambient(device):
        workspace = decode_workspace(4, 64, 192, CPU)
    assert all(t.device == CPU for t in workspace)
    assert [t.dtype for t in workspace] == [torch.float32, torch.int32, torch.float32, torch.int32]
