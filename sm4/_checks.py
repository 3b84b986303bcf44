"""Argument checks that run before any kernel: a clear error naming the argument, or nothing.

``Checker`` binds the size names of shape specs such as ``"(T, d)"`` and ``"(d, E)"`` across the
arguments of one call, so a mismatch is reported with where the expected size came from:

    >>> c = Checker("sm4.ops.topk_gating")
    >>> c.tensor("x", x, "(T, d)", FLOAT_DTYPES)
    >>> c.tensor("router_weight", w, "(d, E)", FLOAT_DTYPES)   # checks d against x

Value checks that need to read tensor data (e.g. token_k's range) run on CPU tensors only, and
not while torch.compile traces: on a GPU they would be a host sync. The kernels clamp such values
into range instead, so memory is never touched out of bounds.
"""

import re

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
_INT_TYPES = (int,)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


_PARSED_SHAPES: dict[str, tuple[tuple[int | None, str, int], ...]] = {}


def _parse_shape(shape: str) -> tuple[tuple[int | None, str, int], ...]:
    """A shape spec such as ``"(E + 1, d)"`` as (literal size or None, size name, offset) per dim.

    Cached in eager mode: the specs are a few string constants, and every op call checks several
    tensors (on a CPU the parsing cost as much as a small kernel). Not while torch.compile traces,
    where the checks run once per compilation and a global cache would only add guards.
    """
    compiling = torch.compiler.is_compiling()
    if not compiling and shape in _PARSED_SHAPES:
        return _PARSED_SHAPES[shape]
    dims = []
    for dim in (d.strip() for d in shape.strip("()").split(",")):
        if not dim:
            continue
        if re.fullmatch(r"\d+", dim):
            dims.append((int(dim), dim, 0))
            continue
        match = re.fullmatch(r"(\w+)\s*\+\s*(\d+)", dim)
        dims.append((None, match.group(1), int(match.group(2))) if match else (None, dim, 0))
    if not compiling:
        _PARSED_SHAPES[shape] = tuple(dims)
    return tuple(dims)


class Checker:
    """Collects the sizes bound by one call's arguments and raises on the first bad one."""

    def __init__(self, op: str):
        self.op = op
        self.sizes: dict[str, tuple[int, str]] = {}  # size name -> (value, argument it came from)
        self.device: tuple[torch.device, str] | None = None

    def fail(self, error: type, message: str):
        raise error(f"{self.op}: {message}")

    def bind(self, name: str, value: int, source: str):
        """Record that size ``name`` is ``value`` (taken from ``source``), or check it."""
        if name in self.sizes and self.sizes[name][0] != value:
            known, origin = self.sizes[name]
            self.fail(ValueError, f"{source} gives {name} = {value}, but {origin} gives {name} = {known}")
        self.sizes.setdefault(name, (value, source))

    def tensor(self, name: str, value, shape: str, dtypes, *, optional: bool = False):
        """Check that ``value`` is a tensor of the given shape spec and dtype, on the common device.

        shape: a spec like ``"(T, d)"``, ``"(E + 1,)"`` or ``"(T,)"``; names are bound across
        calls, integers are literal, ``NAME + 1`` is allowed.
        """
        if value is None and optional:
            return
        if not isinstance(value, torch.Tensor):
            self.fail(TypeError, f"{name} must be a torch.Tensor of shape {shape}, got {type(value).__name__}")
        dims = _parse_shape(shape)
        if value.dim() != len(dims):
            self.fail(
                ValueError,
                f"{name} must have {len(dims)} dimension(s) {shape}, got shape {tuple(value.shape)}",
            )
        if value.dtype not in dtypes:
            self.fail(TypeError, f"{name} must have dtype in ({_dtype_names(dtypes)}), got {value.dtype}")
        for (literal, base, extra), size in zip(dims, value.shape):
            if literal is not None:
                if size != literal:
                    self.fail(ValueError, f"{name} must have shape {shape}, got {tuple(value.shape)}")
                continue
            self.bind(base, size - extra, f"{name} (shape {tuple(value.shape)}, expected {shape})")
        self.same_device(name, value)

    def same_device(self, name: str, value: torch.Tensor):
        if self.device is None:
            self.device = (value.device, name)
        elif value.device != self.device[0]:
            self.fail(
                ValueError,
                f"{name} is on {value.device} but {self.device[1]} is on {self.device[0]}; "
                "all tensors of one call must be on the same device",
            )

    def integer(self, name: str, value, low: int, high: int | None = None, high_name: str = ""):
        """Check a Python int in [low, high]."""
        if isinstance(value, bool) or not isinstance(value, _INT_TYPES):
            hint = ""
            if isinstance(value, torch.Tensor):
                hint = " (pass a per-token k as token_k=, with k its maximum)" if name == "k" else ""
            self.fail(TypeError, f"{name} must be a Python int, got {type(value).__name__}{hint}")
        if value < low or (high is not None and value > high):
            upper = f" and <= {high_name} = {high}" if high is not None else ""
            self.fail(ValueError, f"{name} must be >= {low}{upper}, got {value}")

    def number(self, name: str, value, low: float = 0.0):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(TypeError, f"{name} must be a float, got {type(value).__name__}")
        if not value >= low:  # also rejects NaN
            self.fail(ValueError, f"{name} must be >= {low}, got {value}")

    def flag(self, name: str, value):
        if not isinstance(value, bool):
            self.fail(TypeError, f"{name} must be a bool, got {type(value).__name__}")

    def choice(self, name: str, value, choices):
        if value not in choices:
            self.fail(ValueError, f"{name} must be one of {sorted(choices)}, got {value!r}")

    def per_token_k(self, token_k, k: int):
        """token_k: optional (T,) int32/int64 with 1 <= k_t <= k (values checked on CPU)."""
        if token_k is None:
            return
        self.tensor("token_k", token_k, "(T,)", INDEX_DTYPES)
        if token_k.device.type == "cpu" and not torch.compiler.is_compiling() and token_k.numel():
            low, high = int(token_k.min()), int(token_k.max())
            if low < 1 or high > k:
                self.fail(ValueError, f"token_k values must lie in [1, k={k}], got values in [{low}, {high}]")

    def generator(self, generator, device: torch.device):
        if generator is None:
            return
        if not isinstance(generator, torch.Generator):
            self.fail(TypeError, f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            self.fail(ValueError, f"generator is on {generator.device} but the inputs are on {device}")
