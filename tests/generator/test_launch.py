"""Triton launches go to the current CUDA device; every kernel op in generator/ makes its tensors' device
current first (generator/launch.py), so a model on a second GPU runs its kernels there."""
import contextlib

import pytest
import torch

from generator import decode_attention, fused_attention, kth_largest
from generator import launch
from generator.launch import STATIC_MATMUL_ENV, int32_offsets, linear_in_half, on_device, prefer_static_matmul_schedules
from tests.kernels import KERNEL_DEVICE, needs_kernel


def test_on_device_is_a_no_op_for_cpu_tensors():
    assert isinstance(on_device(torch.zeros(1)), contextlib.nullcontext)


def test_static_matmul_schedules_set_only_what_the_environment_lacks():
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PATH": "/bin"}
    assert prefer_static_matmul_schedules(env) == {"CUBLASLT_WORKSPACE_SIZE": "0"}
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PATH": "/bin", "CUBLASLT_WORKSPACE_SIZE": "0"}
    empty = {}
    assert prefer_static_matmul_schedules(empty) == STATIC_MATMUL_ENV == empty
    assert STATIC_MATMUL_ENV == {"CUBLAS_WORKSPACE_CONFIG": ":0:0", "CUBLASLT_WORKSPACE_SIZE": "0"}
    assert prefer_static_matmul_schedules(empty) == {}                  # a second call sets nothing


def test_int32_offsets_counts_the_largest_element_offset_of_a_view():
    """masked-B's packed qkv (S, 257, 3, 12, 64) fits up to S = 3624 sequences (1812 images under CFG):
    (S - 1) 592128 + 592127 < 2^31 - 2^20."""
    def view(shape, strides):
        return torch.empty(0, device="meta").as_strided(shape, strides)

    fits, too_big = (view((S, 257, 3, 12, 64), (592128, 2304, 768, 64, 1)) for S in (3624, 3625))
    assert int32_offsets(fits) and not int32_offsets(too_big)
    assert int32_offsets(torch.zeros(4, 5)) and not int32_offsets(fits, too_big)
    assert not int32_offsets(view((2, 3), (2**31, 1)))       # offsets, not element counts: 6 elements


@needs_kernel
def test_kernel_ops_run_their_reference_past_int32_offsets(monkeypatch):
    """The kernels' offsets are int32: past the limit the ops compute the reference instead of launching."""
    monkeypatch.setattr(launch, "INT32_OFFSET_LIMIT", 100)
    for kernel in (kth_largest, decode_attention):      # a launch would now fail loudly
        name = "_kth_largest_kernel" if kernel is kth_largest else "_one_query_kernel"
        monkeypatch.setattr(kernel, name, None)
    x = torch.randn(4, 1000, device=KERNEL_DEVICE)
    assert torch.equal(torch.ops.tessera.kth_largest(x, 7), kth_largest.kth_largest_reference(x, 7)[:, 0])
    q, k, v = (torch.randn(2, 3, n, 64, device=KERNEL_DEVICE) for n in (1, 40, 40))
    mask = torch.ones(1, 40, dtype=torch.bool, device=KERNEL_DEVICE)
    assert torch.equal(torch.ops.tessera.attend_one_query(q, k, v, mask),
                       decode_attention.attend_one_query_reference(q, k, v, mask))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2 or fused_attention.triton is None, reason="needs two GPUs")
def test_kernels_on_the_second_gpu_equal_the_first_while_the_first_is_current():
    torch.manual_seed(0)
    qkv = torch.randn(2, 33, 3, 2, 64, dtype=torch.bfloat16)
    w, cos, sin = torch.ones(64), torch.ones(33, 32), torch.zeros(33, 32)
    x = torch.randn(4, 1000)
    q, k, v = torch.randn(2, 3, 1, 64), torch.randn(2, 3, 40, 64), torch.randn(2, 3, 40, 64)
    mask = torch.ones(1, 40, dtype=torch.bool)
    outs = []
    for dev in ("cuda:0", "cuda:1"):
        with torch.cuda.device(0), torch.no_grad():
            outs.append([
                fused_attention.launch(qkv.to(dev), w.to(dev), w.to(dev), cos.to(dev), sin.to(dev), 1e-6).cpu(),
                kth_largest.kth_largest(x.to(dev), 7).cpu(),
                decode_attention.attend_one_query(*(t.to(dev, torch.bfloat16) for t in (q, k, v)), mask.to(dev)).cpu()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_a_kernel_replacing_a_linear_matches_its_compute_dtype_outside_autocast():
    """Without autocast ``F.linear`` computes in x's dtype: a bf16/fp16 kernel only where x and the weight share it."""
    w_bf16, w_fp32 = torch.empty(4, 8, dtype=torch.bfloat16), torch.empty(4, 8)
    assert linear_in_half(torch.empty(2, 8, dtype=torch.bfloat16), w_bf16)
    assert linear_in_half(torch.empty(2, 8, dtype=torch.float16), w_bf16.half())
    assert not linear_in_half(torch.empty(2, 8), w_bf16)                       # x float32: F.linear would refuse
    assert not linear_in_half(torch.empty(2, 8), w_fp32)                       # float32: no half kernel
    assert not linear_in_half(torch.empty(2, 8, dtype=torch.float16), w_bf16)


def test_programmatic_dependent_launch_only_where_the_device_and_triton_have_it(monkeypatch):
    """``pdl_launch``: ``PDL`` on, a Triton with the launch option, a CUDA device of capability >= 9; never for CPU
    tensors (the interpreter). ``pdl_kwargs`` passes Triton's option only when on (older Tritons reject the key)."""
    monkeypatch.setattr(launch, "PDL", True)
    assert not launch.pdl_launch(torch.zeros(1))
    assert launch.pdl_kwargs(torch.zeros(1)) == {"PDL": False, "TRIGGER_FIRST": launch.PDL_TRIGGER_FIRST}
    monkeypatch.setattr(launch, "PDL_TRIGGER_FIRST", True)
    assert launch.pdl_kwargs(torch.zeros(1))["TRIGGER_FIRST"]
    if torch.cuda.is_available():
        x = torch.zeros(1, device="cuda")
        on = launch.PDL_SUPPORTED and torch.cuda.get_device_capability()[0] >= 9
        assert launch.pdl_launch(x) == on
        assert launch.pdl_kwargs(x) == {"PDL": on, "TRIGGER_FIRST": True, **({"launch_pdl": True} if on else {})}
        monkeypatch.setattr(launch, "PDL", False)
        assert not launch.pdl_launch(x) and "launch_pdl" not in launch.pdl_kwargs(x)
