"""Backend selection: capabilities, auto order, the three ways to force, and the refusal messages."""

import os
import subprocess
import sys

import pytest
import torch

import sm4
from sm4 import backends, dispatch, ops

IDS = torch.tensor([[0, 2], [1, -1], [2, 2]])
GROUPED_ARGS = (torch.randn(4, 3), torch.randn(2, 3, 5), None, torch.tensor([0, 1, 4]))


def chosen(op, tensors, backend=None):
    return dispatch.select(op, tensors, backend)[0]


def test_auto_picks_the_compiled_cpu_kernel_and_falls_back_to_the_reference():
    assert chosen("expert_histogram", [IDS]) == "cpu"
    assert chosen("topk_gating", [torch.randn(2, 3)]) == "cpu"
    assert chosen("grouped_linear", [torch.randn(2, 3)]) == "cpu"
    assert chosen("grouped_linear", [torch.empty(2, 3, device="meta")]) == "reference"  # no kernel runs on meta
    assert chosen("topk_gating", [torch.randn(2, 3, dtype=torch.float64)]) == "cpu"


def test_triton_interpreter_is_never_chosen_automatically_for_cpu_tensors():
    reasons = backends.TRITON.not_supported_reasons("expert_histogram", [IDS], forced=False)
    assert reasons, "the interpreter must not be auto-selected"
    if os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available():
        assert any("only when the backend is forced" in r for r in reasons)
        assert backends.TRITON.not_supported_reasons("expert_histogram", [IDS], forced=True) == []


def test_force_by_argument_context_manager_and_environment(monkeypatch):
    assert chosen("expert_histogram", [IDS], backend="reference") == "reference"
    with sm4.use_backend("reference"):
        assert chosen("expert_histogram", [IDS]) == "reference"
        assert chosen("expert_histogram", [IDS], backend="cpu") == "cpu"  # the argument wins
        with sm4.use_backend("auto"):
            assert chosen("expert_histogram", [IDS]) == "cpu"
        assert chosen("expert_histogram", [IDS]) == "reference"
    assert chosen("expert_histogram", [IDS]) == "cpu"
    monkeypatch.setenv("SM4_BACKEND", "reference")
    assert chosen("expert_histogram", [IDS]) == "reference"
    with sm4.use_backend("cpu"):
        assert chosen("expert_histogram", [IDS]) == "cpu"  # the context manager beats the env
    monkeypatch.setenv("SM4_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"SM4_BACKEND: unknown sm4 backend 'nonsense'; choose from"):
        chosen("expert_histogram", [IDS])


def test_unknown_backend_names_are_rejected():
    with pytest.raises(ValueError, match="unknown sm4 backend 'gpu'"):
        with sm4.use_backend("gpu"):
            pass
    with pytest.raises(ValueError, match="backend=: unknown sm4 backend"):
        ops.expert_histogram(IDS, 3, backend="gpu")


META_GROUPED_ARGS = tuple(None if t is None else t.to("meta") for t in GROUPED_ARGS)


def test_a_forced_backend_is_strict_and_says_why():
    with pytest.raises(sm4.BackendNotSupportedError, match=r"backend 'cpu' \(forced by the backend= argument\) cannot run this call: runs on cpu tensors, got meta"):
        ops.grouped_linear(*META_GROUPED_ARGS, backend="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(sm4.BackendNotSupportedError, match=r"backend 'cuda' \(forced by sm4.use_backend\(\)\)"):
            with sm4.use_backend("cuda"):
                ops.expert_histogram(IDS, 3)


def test_refusal_lists_every_backend_when_none_can_run(monkeypatch):
    # Without the reference fallback, no kernel runs on meta tensors: the error gives each reason.
    monkeypatch.setattr(dispatch, "PREFERENCE", (backends.CUDA, backends.TRITON, backends.CPU))
    with pytest.raises(sm4.BackendNotSupportedError) as error:
        ops.grouped_linear(*META_GROUPED_ARGS)
    message = str(error.value)
    assert message.startswith("sm4.ops.grouped_linear: no backend can run this call:")
    for name in ("cuda", "triton", "cpu"):
        assert f"\n  {name}: " in message
    assert "cpu: runs on cpu tensors, got meta" in message


def test_a_backend_without_the_kernel_says_so():
    bare = backends.Backend.create("bare", "no kernels", {"cpu"}, (torch.float32,), load_kernels=dict)
    assert bare.not_supported_reasons("grouped_linear", [torch.zeros(2)], forced=True) == [
        "grouped_linear is not implemented on this backend yet"
    ]


def test_device_capability():
    assert backends.CPU.not_supported_reasons("expert_histogram", [torch.empty(2, device="meta")], forced=False) == [
        "runs on cpu tensors, got meta"
    ]


def test_dtype_capabilities():
    assert backends.CUDA.dtypes == (torch.float16, torch.bfloat16, torch.float32)
    assert torch.float64 in backends.REFERENCE.dtypes
    if backends.TRITON.unavailable_reason is None:
        reasons = backends.TRITON.not_supported_reasons("expert_histogram", [torch.zeros(2, dtype=torch.float64)], forced=True)
        assert reasons == ["does not support dtype torch.float64"]


def test_reports_of_what_is_available():
    status = sm4.available_backends()
    assert set(status) == {"cuda", "triton", "cpu", "reference"}
    assert status["reference"] is None and status["cpu"] is None
    if not torch.cuda.is_available():
        assert "no CUDA" in status["cuda"] or "without CUDA" in status["cuda"]
    implemented = sm4.implemented_ops()
    assert implemented["reference"] == sorted(backends.STEP_OPS)
    assert {"expert_histogram", "topk_gating"} <= set(implemented["cpu"])
    info = sm4.build_info()
    assert info["compiled_ops"]["expert_histogram"][0] == "CPU"


def test_missing_extension_gives_a_stub_that_says_how_to_build_it():
    # A fresh interpreter where `import sm4._C` fails: sm4 still imports and runs on the reference.
    code = (
        "import sys; sys.modules['sm4._C'] = None\n"
        "import torch, sm4\n"
        "print('CPU-REASON', sm4.available_backends()['cpu'])\n"
        "ids = torch.tensor([[0, 1]])\n"
        "print('AUTO', sm4.ops.expert_histogram(ids, 2)[1].tolist())\n"
        "try:\n    sm4.ops.expert_histogram(ids, 2, backend='cpu')\n"
        "except sm4.BackendNotSupportedError as e:\n    print('FORCED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SM4_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "CPU-REASON the compiled extension sm4._C is not importable" in out
    assert "pip install --no-build-isolation -e ." in out
    assert "AUTO [0, 1, 2]" in out
    assert "FORCED sm4.ops.expert_histogram: backend 'cpu'" in out


def test_size_limits_and_unverified_kernels_are_reasons():
    cuda = backends.CUDA
    assert cuda.limits["topk_gating"] == {"E": 256}
    # Build a stand-in with the CUDA backend's rules but available, to read its reasons here.
    import dataclasses

    stand_in = dataclasses.replace(cuda, unavailable_reason=None, kernels={"topk_gating": None}, device_types=frozenset({"cpu"}))
    x = torch.zeros(2, 2)
    assert stand_in.not_supported_reasons("topk_gating", [x], forced=True, sizes={"E": 300}) == [
        "topk_gating supports E <= 256, got E = 300"
    ]
    assert stand_in.not_supported_reasons("topk_gating", [x], forced=True, sizes={"E": 64}) == []
    auto = stand_in.not_supported_reasons("topk_gating", [x], forced=False, sizes={"E": 64})
    assert auto == ["its topk_gating kernel has not yet been run on a GPU; it is used only when forced"]
