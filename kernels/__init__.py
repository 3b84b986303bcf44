"""Triton kernels of sm4, installed as ``sm4.kernels`` (from the top-level ``kernels/`` folder).

One file per op: its ``@triton.jit`` kernels, the launcher, and the ``torch.library.custom_op``
that makes it visible to ``torch.compile``. The test suite compiles, for sm_80 and sm_90 and
without a GPU, exactly the launches these launchers make (tests/triton_launches.py captures them
on meta tensors).

On a machine without a GPU, set ``TRITON_INTERPRET=1`` *before* importing these modules to run the
kernels on CPU tensors through Triton's interpreter (the test suite's conftest does this).
"""
