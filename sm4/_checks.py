"""Argument checks that run before any kernel: a clear error naming the argument, or nothing.

``Checker`` binds the size names of shape specs such as ``"(T, d)"`` and ``"(d, E)"`` across the
arguments of one call, so a mismatch is reported with where the expected size came from:

    >>> c = Checker("sm4.ops.topk_gating")
    >>> c.tensor("x", x, "(T, d)", FLOAT_DTYPES)
    >>> c.tensor("router_weight", w, "(d, E)", FLOAT_DTYPES)   # checks d against x

Value checks that need to read tensor data (token_k's range, expert ids, expert offsets, a
hand-built ``RoutingMetadata``) run on CPU tensors only (``reads_values``), and not while
torch.compile traces: on a GPU they would be a host sync. On a GPU the kernels mask such values
instead (an out-of-range row is dropped or reads zeros), so memory is never touched out of
bounds; the CPU kernels also check their indices themselves (a ValueError, never a crash).

The CPU value checks are one vectorised numpy pass over the tensors' memory (``Tensor.numpy()``
is a view: no copy), O(N). Metadata that ``sm4.ops.routing_metadata`` returned and nobody has
modified since is not checked again (``trust_metadata``), so the MoE composites pay nothing.
"""

import re
import weakref

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
_INT_TYPES = (int,)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def received(value) -> str:
    """A received value as an error message states it: a tensor by its shape and dtype (its data
    may be large, or on a GPU), anything else by its type and (shortened) repr."""
    if isinstance(value, torch.Tensor):
        return f"a Tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


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
            self.fail(TypeError, f"{name} must be a torch.Tensor of shape {shape}, got {received(value)}")
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
            self.fail(TypeError, f"{name} must be a Python int, got {received(value)}{hint}")
        if value < low or (high is not None and value > high):
            upper = f" and <= {high_name} = {high}" if high is not None else ""
            self.fail(ValueError, f"{name} must be >= {low}{upper}, got {value}")

    def number(self, name: str, value, low: float = 0.0):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(TypeError, f"{name} must be a float, got {received(value)}")
        if not value >= low:  # also rejects NaN
            self.fail(ValueError, f"{name} must be >= {low}, got {value}")

    def flag(self, name: str, value):
        if not isinstance(value, bool):
            self.fail(TypeError, f"{name} must be a bool, got {received(value)}")

    def choice(self, name: str, value, choices):
        if value not in choices:
            self.fail(ValueError, f"{name} must be one of {sorted(choices)}, got {value!r}")

    def per_token_k(self, token_k, k: int):
        """token_k: optional (T,) int32/int64 with 1 <= k_t <= k (values checked on CPU)."""
        if token_k is None:
            return
        self.tensor("token_k", token_k, "(T,)", INDEX_DTYPES)
        if reads_values(token_k) and token_k.numel():
            low, high = int(token_k.min()), int(token_k.max())
            if low < 1 or high > k:
                self.fail(ValueError, f"token_k values must lie in [1, k={k}], got values in [{low}, {high}]")

    def generator(self, generator, device: torch.device):
        if generator is None:
            return
        if not isinstance(generator, torch.Generator):
            self.fail(TypeError, f"generator must be a torch.Generator, got {received(generator)}")
        if generator.device.type != device.type:
            self.fail(ValueError, f"generator is on {generator.device} but the inputs are on {device}")


def reads_values(tensor: torch.Tensor) -> bool:
    """Whether value checks read ``tensor``: a CPU tensor, in eager mode (no host sync, no trace)."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


# ---- RoutingMetadata that sm4 made: checked once, when it was made ----------------------------
# A RoutingMetadata is an immutable tuple of mutable tensors. What routing_metadata returned is
# right by construction; the mark below remembers that, on the assignment_row tensor, as weak
# references to the five tensors and their version counters (bumped by every in-place write). A
# tuple rebuilt from other tensors (``_replace``), or one whose tensors were written in place, is
# no longer marked and gets the full check. Inference tensors have no version counter: for them
# the mark holds the tensors only. (A write that bypasses the version counter, e.g. through
# ``.numpy()`` or in inference mode, is not seen: the CPU kernels' own index checks and torch's
# indexing on the reference path still keep memory safe, and GPU kernels mask.)
_MARK = "_sm4_metadata_mark"


def _versions(metadata) -> tuple | None:
    a, b, c, d, e = metadata
    return None if e.is_inference() else (a._version, b._version, c._version, d._version, e._version)


def trust_metadata(metadata) -> None:
    """Mark metadata made by sm4 as valid (eager mode only: a no-op while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return
    metadata.assignment_row.__dict__[_MARK] = (tuple(weakref.ref(t) for t in metadata), _versions(metadata))


def _trusted(metadata) -> bool:
    mark = metadata.assignment_row.__dict__.get(_MARK)
    if mark is None:
        return False
    (ra, rb, rc, rd, re_), versions = mark
    a, b, c, d, e = metadata
    return ra() is a and rb() is b and rc() is c and rd() is d and re_() is e and versions == _versions(metadata)


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def check_offsets_values(c: "Checker", name: str, offsets: torch.Tensor, rows: int, rows_name: str) -> None:
    """offsets (E + 1,) int64 (shape already checked): start at 0, non-decreasing, end <= rows.

    A ValueError naming ``name`` and the bad entries; CPU tensors only (see ``reads_values``).
    """
    if not reads_values(offsets):
        return
    o = offsets.numpy()
    if o[0] != 0:
        c.fail(ValueError, f"{name} must start at 0, got {name}[0] = {int(o[0])}")
    steps = np.diff(o)
    if steps.size and steps.min() < 0:
        e = _first(steps < 0)
        c.fail(ValueError, f"{name} must be non-decreasing, got {name}[{e}] = {int(o[e])} > {name}[{e + 1}] = {int(o[e + 1])}")
    if o[-1] > rows:
        c.fail(ValueError, f"{name}[-1] = {int(o[-1])} (the rows in use) must be <= {rows_name} = {rows}")


def check_metadata_values(c: "Checker", metadata) -> None:
    """The values of a RoutingMetadata (shapes and dtypes already checked), in one O(N) pass.

    What must hold is what routing_metadata makes (see sm4.types.RoutingMetadata), A being
    expert_offsets[-1]: offsets valid for N rows; expert_counts their differences;
    sorted_assignment in [0, N) and sorted_token = sorted_assignment // k_max; assignment_row in
    [-1, A) with A active entries, row i < A holding the assignment whose assignment_row is i,
    and the padding rows i >= A holding inactive ones. Anything else is a ValueError naming the
    field and the first bad value. CPU tensors only; metadata from routing_metadata is trusted.
    """
    if torch.compiler.is_compiling() or _trusted(metadata) or metadata.assignment_row.device.type != "cpu":
        return
    rows = metadata.sorted_assignment.shape[0]
    k_max = metadata.assignment_row.shape[1]
    check_offsets_values(c, "metadata.expert_offsets", metadata.expert_offsets, rows, "N (the rows of metadata.sorted_token)")
    offsets = metadata.expert_offsets.numpy()
    counts = metadata.expert_counts.numpy()
    steps = np.diff(offsets)
    if not np.array_equal(counts, steps):
        e = _first(counts != steps)
        c.fail(ValueError, f"metadata.expert_counts[{e}] = {int(counts[e])}, but metadata.expert_offsets gives "
                           f"{int(steps[e])} rows to expert {e}")
    if rows == 0:
        return
    active = int(offsets[-1])
    order = metadata.sorted_assignment.numpy()
    if order.min() < 0 or order.max() >= rows:
        i = _first((order < 0) | (order >= rows))
        c.fail(ValueError, f"metadata.sorted_assignment values must lie in [0, N = {rows}), got "
                           f"metadata.sorted_assignment[{i}] = {int(order[i])}")
    token = metadata.sorted_token.numpy()
    owner = order // k_max
    if not np.array_equal(token, owner):
        i = _first(token != owner)
        c.fail(ValueError, f"metadata.sorted_token[{i}] = {int(token[i])}, but metadata.sorted_assignment[{i}] = "
                           f"{int(order[i])} is an assignment of token {int(owner[i])} (k_max = {k_max})")
    row_of = metadata.assignment_row.numpy().reshape(-1)
    if row_of.min() < -1 or row_of.max() >= active:
        i = _first((row_of < -1) | (row_of >= active))
        c.fail(ValueError, f"metadata.assignment_row values must lie in [-1, metadata.expert_offsets[-1] = {active}), "
                           f"got metadata.assignment_row[{i // k_max}, {i % k_max}] = {int(row_of[i])}")
    expected = np.arange(rows)
    expected[active:] = -1
    seen = row_of[order]
    if not np.array_equal(seen, expected):
        i = _first(seen != expected)
        a = int(order[i])
        what = f"row {i} < {active}" if i < active else f"padding row {i} (>= metadata.expert_offsets[-1] = {active})"
        c.fail(ValueError, f"metadata.sorted_assignment[{i}] = {a}: {what} holds assignment ({a // k_max}, {a % k_max}), "
                           f"but metadata.assignment_row[{a // k_max}, {a % k_max}] = {int(seen[i])}")
    in_use = int((row_of >= 0).sum())
    if in_use != active:
        c.fail(ValueError, f"metadata.assignment_row has {in_use} active entries (>= 0), but "
                           f"metadata.expert_offsets[-1] = {active}")
