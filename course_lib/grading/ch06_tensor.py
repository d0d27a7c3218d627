"""Chapter 6's grader: the learner's RowParallelLinear and its g operator, vs nn.Linear.

The learner writes, in a module of their own (``%%writefile my_row_parallel.py``):

- ``ReduceFromTensorParallel(torch.autograd.Function)``: Megatron's **g**, forward an
  all-reduce (sum) over the tensor-parallel group, backward the identity
  (``forward(ctx, x, group)``, ``backward(ctx, grad) -> (grad, None)``);
- ``RowParallelLinear(nn.Module)`` with the classmethod ``from_linear(linear, group)``: it
  keeps this rank's columns of the reference weight (``weight`` of shape
  ``(out_features, in_features // N)``, group rank r holding columns ``[r k, (r + 1) k)``)
  and the whole bias; ``forward(x_shard)`` takes this rank's slice of the input's last
  dimension and returns the full ``x @ W.T + b`` on every rank, the bias added once, after
  the all-reduce. ``from_linear`` raises ValueError when N does not divide ``in_features``.

On every case (:data:`~course_lib.grading.core.DEFAULT_CASES`: 2, 3 and 4 ranks, then the
subgroups (1, 2, 3) and (0, 2) of 4, one spawn per world size) each member builds, for a
seeded ``nn.Linear(12, 5)`` and a bias-free one (12 is divisible by 2, 3 and 4; 5 by none),
the learner's layer with ``from_linear`` and checks, in this order:

1. what the layer holds: ``weight`` an ``nn.Parameter`` of shape (5, 12 / N) equal to this
   rank's columns (a row slice, the global rank on a subgroup, the world's size for N,
   another rank's columns are named), ``bias`` the whole reference bias (or None), and
   nothing more: no tensor holding more than its columns (the reference kept, a view of
   the full weight) and no memory shared with the reference;
2. the output of ``layer(x_shard)`` against ``ref(x)`` (a missing all-reduce, the bias
   added on every rank before the sum, the mean instead of the sum are named), and that
   it requires grad;
3. after ``y.backward(grad_out)``: ``x_shard.grad`` against the reference's input gradient
   slice (N times too large = an all-reduce in backward), ``weight.grad`` against the
   reference weight gradient's columns, ``bias.grad`` against the reference's; and that
   ``x_shard``, ``grad_out`` and the reference layer are unchanged;
4. ``ReduceFromTensorParallel.apply(x, group)`` on its own: the sum of the members' inputs,
   and the identity in backward;
5. ``from_linear(nn.Linear(13, 5), group)`` raises ValueError naming 13.

After the run the members' outputs must be bitwise equal (one all-reduced tensor). The
library's own layer and operator (``course_lib.parallel.tensor_parallel``'s
``RowParallelLinear``, ``ReduceFromTensorParallel`` and ``reduce_from_tensor_parallel``)
are ruled out while the learner's code runs, by name and by their code objects (however
they were reached: a subclass, an alias). A deadlock (``group=None`` on a subgroup)
becomes the hang hint within :data:`~course_lib.grading.core.HANG_S` seconds.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from course_lib.grading.core import (
    ATOL,
    DEFAULT_CASES,
    RTOL,
    Case,
    ForbiddenCall,
    close,
    grade,
    import_learner,
    worst,
)

IN, OUT = 12, 5  # in_features divisible by N = 2, 3 and 4; out_features by none
IN_BAD = 13  # divisible by no N > 1: from_linear must refuse it
B, T = 2, 3  # the input is (B, T, IN), as between two layers of a transformer
BIASES = (True, False)  # the reference with a bias, then without
WHAT = "the row-parallel layer"
LIBRARY = "course_lib.parallel.tensor_parallel"
FORBIDDEN = ("RowParallelLinear", "ReduceFromTensorParallel", "reduce_from_tensor_parallel")
ALLOWED = (
    "write RowParallelLinear and ReduceFromTensorParallel yourself, with "
    "dist.all_reduce(..., group=group) or chapter 1's course_lib.collectives.ring_all_reduce; "
    "the library's tensor-parallel layer and g operator are the answer key"
)
HANG_HINT = (
    "all-reduce over group: every member must run the same all-reduce with group=group, "
    "the group from_linear received (keep it on the layer); group=None means the whole "
    "world, and on a subgroup the ranks outside it never join"
)

# The hints, key words first.
NO_REDUCE = (
    "no all-reduce: this rank's partial product x_shard @ weight.T: g's forward must "
    "all-reduce (sum) the partial products over group"
)
BIAS_N_TIMES = (
    "bias added N times: add the bias once, after the all-reduce (each rank adding it "
    "before the sum adds it N times)"
)
MEAN = (
    "mean instead of sum: g's forward is an all-reduce SUM over group (the partial "
    "products add up to x @ W.T): do not divide by N"
)
BACKWARD_REDUCE = (
    "all-reduce in backward: g's backward is the identity: the output gradient is already "
    "the same on every rank; an all-reduce in backward (e.g. "
    "torch.distributed.nn.functional.all_reduce, whose backward all-reduces) multiplies it "
    "by N"
)
GLOBAL_RANK = (
    "global rank on a subgroup: it is the slice of this rank's global rank "
    "(dist.get_rank()), which on a subgroup is not its rank in group: use "
    "dist.get_rank(group)"
)
WORLD_SIZE = (
    "world size on a subgroup: N is the size of group, dist.get_world_size(group), not of "
    "the whole world (dist.get_world_size())"
)


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


# ----------------------------------------------------------------------------------------
# The answer key, ruled out


class _Refused:
    """Stands for a library name while the learner's code runs: any use is refused."""

    def __init__(self, qualified: str) -> None:
        self.message = f"{qualified} is not allowed in this exercise: {ALLOWED}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ForbiddenCall(self.message)

    def __getattr__(self, name: str) -> Any:
        raise ForbiddenCall(self.message)

    def __mro_entries__(self, bases: tuple) -> tuple:  # `class Mine(RowParallelLinear)`
        raise ForbiddenCall(self.message)


def _library() -> ModuleType | None:
    """The library's tensor-parallel module, or None while it does not exist."""
    try:
        return importlib.import_module(LIBRARY)
    except ModuleNotFoundError as err:
        if err.name not in (LIBRARY, LIBRARY.rsplit(".", 1)[0]):
            raise
        return None


def _codes(obj: Any) -> Iterator[Any]:
    """The code objects of a function, or of every method a class defines itself."""
    if isinstance(obj, type):
        for value in vars(obj).values():
            value = getattr(value, "__func__", value)  # staticmethod, classmethod
            if hasattr(value, "__code__"):
                yield value.__code__
    elif hasattr(obj, "__code__"):
        yield obj.__code__


@contextlib.contextmanager
def _guarded() -> Iterator[None]:
    """The learner's code runs here: the library's layer and operator refused.

    By name (each replaced in the module by a :class:`_Refused`, restored on exit) and by
    code object: a profile hook refuses a call to their code however it was reached (a
    subclass's ``super()``, a reference taken in another module).
    """
    module = _library()
    if module is None:
        yield
        return
    present = [name for name in FORBIDDEN if hasattr(module, name)]
    codes = {
        code: f"{LIBRARY}.{name}" for name in present for code in _codes(getattr(module, name))
    }

    def guard(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in codes:
            raise ForbiddenCall(f"{codes[frame.f_code]} is not allowed in this exercise: {ALLOWED}")

    saved = {name: getattr(module, name) for name in present}
    previous = sys.getprofile()
    for name in present:
        setattr(module, name, _Refused(f"{LIBRARY}.{name}"))
    sys.setprofile(guard)
    try:
        yield
    finally:
        sys.setprofile(previous)
        for name, original in saved.items():
            setattr(module, name, original)


def _learner(cwd: str, module_name: str) -> ModuleType:
    """The learner's module, imported under the guard, with its two classes checked."""
    with _guarded():  # a top-level `from course_lib.parallel.tensor_parallel import ...` too
        module = import_learner(cwd, module_name)
    for name in ("RowParallelLinear", "ReduceFromTensorParallel"):
        value = vars(module).get(name)
        if isinstance(value, _Refused):  # the library's, imported under the guard
            raise ForbiddenCall(value.message)
    layer = getattr(module, "RowParallelLinear", None)
    if not (isinstance(layer, type) and issubclass(layer, nn.Module)):
        raise AssertionError(f"{module_name}.py defines no class RowParallelLinear(nn.Module)")
    if not callable(getattr(layer, "from_linear", None)):
        raise AssertionError(
            "RowParallelLinear has no from_linear: define it as a @classmethod "
            "from_linear(cls, linear, group) that returns the layer"
        )
    g = getattr(module, "ReduceFromTensorParallel", None)
    if not (isinstance(g, type) and issubclass(g, torch.autograd.Function)):
        raise AssertionError(
            f"{module_name}.py defines no class ReduceFromTensorParallel(torch.autograd.Function)"
        )
    return module


# ----------------------------------------------------------------------------------------
# One member's reference


class _Reference:
    """A seeded ``nn.Linear(IN, OUT)``, an input and an output gradient; its own backward."""

    def __init__(self, bias: bool, device: torch.device) -> None:
        torch.manual_seed(6 + bias)
        self.desc = f"nn.Linear({IN}, {OUT}" + (")" if bias else ", bias=False)")
        self.ref = nn.Linear(IN, OUT, bias=bias).to(device)  # never trained: what we compare
        gen = torch.Generator().manual_seed(60 + bias)
        self.x = torch.randn(B, T, IN, generator=gen).to(device)  # (B, T, IN)
        self.grad_out = torch.randn(B, T, OUT, generator=gen).to(device)  # (B, T, OUT)
        x = self.x.clone().requires_grad_()
        y = self.ref(x)  # (B, T, OUT)
        y.backward(self.grad_out)
        self.y, self.grad_x = y.detach(), x.grad
        self.grad_w = self.ref.weight.grad
        self.grad_b = None if self.ref.bias is None else self.ref.bias.grad
        self.ref.zero_grad(set_to_none=True)
        self.given = nn.Linear(IN, OUT, bias=bias).to(device)  # the learner's copy of ref
        self.given.load_state_dict(self.ref.state_dict())

    def unchanged(self) -> str:
        """'' if the learner's copy of the reference still equals it, else what changed."""
        for name, p in self.given.named_parameters():
            if not torch.equal(p.detach(), getattr(self.ref, name).detach()):
                return f"linear.{name} was modified"
            if p.grad is not None:
                return f"linear.{name}.grad was set (the reference took part in backward)"
        return ""


class _Member:
    """Where this member is: N, group rank r, global rank, this rank's columns, the labels."""

    def __init__(self, ctx: Any, group: Any) -> None:
        self.group, self.n, self.r = group, dist.get_world_size(group), dist.get_rank(group)
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.k = IN // self.n
        self.cols = slice(self.r * self.k, (self.r + 1) * self.k)
        self.subgroup = self.n != self.world

    def who(self, ref: _Reference) -> str:
        return f"{ref.desc}, group rank {self.r} of N={self.n}"

    def columns(self, t: torch.Tensor, j: int) -> torch.Tensor:
        """Group rank j's columns of a (OUT, IN) tensor, or the last dim's slice of any."""
        return t[..., j * self.k : (j + 1) * self.k]


# ----------------------------------------------------------------------------------------
# 1. What the layer holds


def _held(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the layer holds: parameters, buffers and plain attributes, by name."""
    found: dict[int, tuple[str, torch.Tensor]] = {}
    modules: set[int] = set()

    def visit(name: str, obj: Any, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            found.setdefault(id(obj), (name, obj))
        elif isinstance(obj, nn.Module) and id(obj) not in modules and depth < 6:
            modules.add(id(obj))
            for key, value in vars(obj).items():
                if key in ("_parameters", "_buffers", "_modules"):
                    for sub, item in value.items():
                        visit(f"{name}.{sub}", item, depth + 1)
                else:  # plain attributes, hidden ones included
                    visit(f"{name}.{key}", value, depth + 1)
        elif isinstance(obj, list | tuple) and depth < 6:
            for i, item in enumerate(obj):
                visit(f"{name}[{i}]", item, depth + 1)
        elif isinstance(obj, dict) and depth < 6:
            for key, item in obj.items():
                visit(f"{name}[{key!r}]", item, depth + 1)

    visit("layer", layer, 0)
    return {name: t for name, t in found.values()}


def _storage_numel(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes() // max(t.element_size(), 1)


def _check_weight(m: _Member, ref: _Reference, layer: nn.Module) -> None:
    who, w_ref = m.who(ref), ref.ref.weight.detach()
    w = getattr(layer, "weight", None)
    if not isinstance(w, nn.Parameter):
        raise AssertionError(
            f"{who}: layer.weight is {type(w).__name__}, not an nn.Parameter: keep this "
            "rank's columns as nn.Parameter(...) (so .parameters() and the optimizer see it)"
        )
    want = m.columns(w_ref, m.r)
    expected = f"(out_features, in_features // N) = ({OUT}, {m.k})"
    if w.shape != want.shape:
        columns = f"COLUMNS (in_features, dim 1): weight[:, r*k:(r+1)*k] with k = {IN}/N"
        if w.shape == w_ref.shape:
            hint = f"the whole weight: a row-parallel layer keeps only this rank's {columns}"
        elif w.shape[-1:] == (IN,):
            hint = f"row slice instead of column slice: a row-parallel layer splits the {columns}"
        elif w.shape == want.T.shape:
            hint = "transposed: keep nn.Linear's layout, (out_features, in_features // N)"
        elif m.subgroup and w.shape == m.columns(w_ref, m.rank).shape:
            hint = GLOBAL_RANK
        elif m.subgroup and w.shape[-1] == IN // m.world:
            hint = WORLD_SIZE
        else:
            hint = f"keep this rank's columns, weight[:, {m.cols.start}:{m.cols.stop}]"
        raise AssertionError(
            f"{who}: layer.weight has shape {_shape(w)}, expected {expected}: {hint}"
        )
    if torch.equal(w.detach(), want):
        return
    got = w.detach()
    candidates = []
    if m.subgroup and m.rank < m.n and m.rank != m.r:
        candidates.append((m.columns(w_ref, m.rank), GLOBAL_RANK))
    candidates += [
        (m.columns(w_ref, j), (
            f"another rank's slice: these are group rank {j}'s columns [{j * m.k}, "
            f"{(j + 1) * m.k}); group rank {m.r} holds columns [{m.cols.start}, "
            f"{m.cols.stop}) (r = dist.get_rank(group))"
        ))
        for j in range(m.n) if j != m.r
    ]  # fmt: skip
    fallback = (
        "not the reference's columns: copy them from linear.weight in from_linear "
        f"(linear.weight.detach()[:, {m.cols.start}:{m.cols.stop}].clone())"
    )
    hint = next((h for value, h in candidates if torch.equal(got, value)), fallback)
    raise AssertionError(
        f"{who}: layer.weight is not the reference's columns [{m.cols.start}, "
        f"{m.cols.stop}): it differs {worst(got, want)}: {hint}"
    )


def _check_bias(m: _Member, ref: _Reference, layer: nn.Module) -> None:
    who = m.who(ref)
    if not hasattr(layer, "bias"):
        raise AssertionError(
            f"{who}: the layer has no attribute bias: keep the reference's whole bias as "
            "nn.Parameter, or set self.bias = None when the reference has none"
        )
    b, b_ref = layer.bias, ref.ref.bias
    if b_ref is None:
        if b is not None:
            raise AssertionError(
                f"{who}: layer.bias is {type(b).__name__}, but the reference has no bias "
                "(linear.bias is None): set self.bias = None"
            )
        return
    if not isinstance(b, nn.Parameter):
        raise AssertionError(
            f"{who}: layer.bias is {type(b).__name__}, not an nn.Parameter: keep the "
            "reference's whole bias, nn.Parameter(linear.bias.detach().clone())"
        )
    if b.shape != b_ref.shape:
        raise AssertionError(
            f"{who}: layer.bias has shape {_shape(b)}, expected ({OUT},): bias whole, not "
            "split: every rank keeps all of it and adds it once, after the all-reduce"
        )
    if not torch.equal(b.detach(), b_ref.detach()):
        hint = "copy linear.bias (linear.bias.detach().clone())"
        if close(b.detach() * m.n, b_ref.detach()):
            hint = "bias divided by N: keep the whole bias and add it once, after the all-reduce"
        raise AssertionError(
            f"{who}: layer.bias differs from the reference's {worst(b.detach(), b_ref)}: {hint}"
        )


def _check_holds(m: _Member, ref: _Reference, layer: nn.Module) -> None:
    """Only this rank's columns and the bias: no full-size tensor, no memory of the reference."""
    who, slice_numel = m.who(ref), OUT * m.k
    bias_numel = 0 if ref.ref.bias is None else OUT
    theirs = {
        p.untyped_storage().data_ptr(): f"linear.{name}" for name, p in ref.given.named_parameters()
    }
    held = _held(layer)
    for name, t in held.items():
        if _storage_numel(t) > slice_numel:
            what = "is a view of a tensor of" if t.numel() < _storage_numel(t) else "holds"
            raise AssertionError(
                f"{who}: {name} (shape {_shape(t)}) {what} {_storage_numel(t)} "
                f"elements: a rank keeps only its columns of the weight ({OUT} x {m.k} = "
                f"{slice_numel}) and the bias ({OUT}): do not keep the reference layer or "
                "its full weight; .clone() the columns you slice"
            )
    for name, t in held.items():
        shared = theirs.get(t.untyped_storage().data_ptr())
        if shared is not None:
            raise AssertionError(
                f"{who}: {name} shares memory with the reference's {shared}: copy it "
                "(.detach().clone()); a layer that shares the reference's tensors changes "
                "with it (an optimizer step on one moves both)"
            )
    total = sum(t.numel() for t in held.values())
    if total > slice_numel + bias_numel:
        names = ", ".join(f"{name} {_shape(t)}" for name, t in held.items())
        raise AssertionError(
            f"{who}: the layer holds {total} elements ({names}), more than its columns "
            f"({slice_numel}) and the bias ({bias_numel}): keep only weight and bias"
        )


# ----------------------------------------------------------------------------------------
# 2. The output, 3. the gradients


def _check_output(m: _Member, ref: _Reference, layer: nn.Module, y: Any, x_shard) -> None:
    who = m.who(ref)
    if not isinstance(y, torch.Tensor):
        raise AssertionError(f"{who}: layer(x_shard) returned {type(y).__name__}, not a tensor")
    want = ref.y
    if y.shape != want.shape:
        raise AssertionError(
            f"{who}: layer(x_shard) has shape {_shape(y)}, expected {_shape(want)} = "
            "(B, T, out_features): the full output, x_shard @ weight.T summed over the ranks"
        )
    got = y.detach()
    if not close(got, want):
        w = layer.weight.detach()
        partial = x_shard.detach() @ w.T  # (B, T, OUT): this rank's share of the sum
        bias = ref.ref.bias
        b = torch.zeros(OUT, device=got.device) if bias is None else bias.detach()
        candidates = [(partial, NO_REDUCE), (partial + b, NO_REDUCE)]
        if ref.ref.bias is not None:
            candidates.append((want + (m.n - 1) * b, BIAS_N_TIMES))
        candidates += [((want - b) / m.n + b, MEAN), (want / m.n, MEAN)]
        fallback = (
            "the output is x @ W.T + b: the partial product x_shard @ weight.T, all-reduced "
            "(summed) over group, then the bias once"
        )
        hint = next((h for value, h in candidates if close(got, value)), fallback)
        raise AssertionError(
            f"{who}: the output differs from the reference's {worst(got, want)}: {hint}"
        )
    if not y.requires_grad:
        raise AssertionError(
            f"{who}: the output does not require grad: nothing may leave autograd in forward "
            "(no .detach(), .data or torch.no_grad()); apply g with "
            "ReduceFromTensorParallel.apply(partial, group)"
        )


def _check_grad(who: str, name: str, got: Any, want: torch.Tensor, n: int, extra: str) -> None:
    """One gradient against the reference's: None, N times too large, or by how much."""
    if got is None:
        raise AssertionError(f"{who}: {name} is None after y.backward(grad_out): {extra}")
    if close(got, want):
        return
    if close(got, want * n):
        hint = BACKWARD_REDUCE
    elif close(got, want / n):
        hint = "divided by N: g's backward is the identity, return (grad, None) unchanged"
    else:
        hint = "g's backward is the identity: return (grad, None)"
    raise AssertionError(f"{who}: {name} differs from the reference's {worst(got, want)}: {hint}")


def _check_inputs(who: str, x_shard, x_before, grad_out, grad_out_before) -> None:
    """The layer must leave its input and the output gradient as it got them."""
    for name, got, want in (("x_shard", x_shard, x_before), ("grad_out", grad_out,
                                                             grad_out_before)):  # fmt: skip
        if not torch.equal(got.detach(), want):
            raise AssertionError(
                f"{who}: the layer modified its input {name} in place: all-reduce a new "
                "tensor (the partial product, or a clone), never the caller's"
            )


def _check_layer(m: _Member, learner: ModuleType, ref: _Reference) -> torch.Tensor:
    """Checks 1 to 3 for one reference; returns the output, for the bitwise comparison."""
    who = m.who(ref)
    with _guarded():
        layer = learner.RowParallelLinear.from_linear(ref.given, m.group)
    if not isinstance(layer, nn.Module):
        raise AssertionError(
            f"{who}: from_linear returned {type(layer).__name__}, not the layer: return "
            "cls(...), a RowParallelLinear"
        )
    _check_weight(m, ref, layer)
    _check_bias(m, ref, layer)
    _check_holds(m, ref, layer)
    x_shard = m.columns(ref.x, m.r).clone().requires_grad_()  # (B, T, IN / N)
    x_before, grad_out = x_shard.detach().clone(), ref.grad_out.clone()
    with _guarded():
        y = layer(x_shard)
    _check_inputs(who, x_shard, x_before, grad_out, ref.grad_out)
    _check_output(m, ref, layer, y, x_shard)
    with _guarded():
        y.backward(grad_out)
    _check_inputs(who, x_shard, x_before, grad_out, ref.grad_out)
    changed = ref.unchanged()
    if changed:
        raise AssertionError(f"{who}: {changed}: from_linear must copy from the reference, "
                             "and the layer must never write into it")  # fmt: skip
    use = "use it in forward (x_shard @ self.weight.T) through autograd"
    _check_grad(who, "x_shard.grad", x_shard.grad, m.columns(ref.grad_x, m.r), m.n, use)
    _check_grad(who, "layer.weight.grad", layer.weight.grad, m.columns(ref.grad_w, m.r),
                m.n, f"{use}, on every rank")  # fmt: skip
    if ref.grad_b is not None:
        _check_grad(who, "layer.bias.grad", layer.bias.grad, ref.grad_b, m.n,
                    "add self.bias on every rank, once, after the all-reduce")  # fmt: skip
    return y.detach().cpu()


# ----------------------------------------------------------------------------------------
# 4. g on its own, 5. the ValueError


def _check_g(m: _Member, learner: ModuleType, device: torch.device) -> None:
    """``ReduceFromTensorParallel.apply(x, group)``: the sum in forward, identity in backward."""
    who = f"ReduceFromTensorParallel on group rank {m.r} of N={m.n}"
    inputs = [torch.randn(3, OUT, generator=torch.Generator().manual_seed(600 + j)) for j in
              range(m.n)]  # fmt: skip
    want = torch.stack(inputs).sum(0).to(device)  # (3, OUT)
    x = inputs[m.r].clone().to(device).requires_grad_()
    grad = torch.randn(3, OUT, generator=torch.Generator().manual_seed(700)).to(device)
    with _guarded():
        y = learner.ReduceFromTensorParallel.apply(x, m.group)
    if not isinstance(y, torch.Tensor) or y.shape != want.shape:
        raise AssertionError(f"{who}: apply(x, group) returned {type(y).__name__} "
                             f"{_shape(y) if isinstance(y, torch.Tensor) else ''}, expected a "
                             f"tensor of x's shape {_shape(want)}")  # fmt: skip
    if not close(y.detach(), want):
        got = y.detach()
        candidates = [(inputs[m.r].to(device), NO_REDUCE), (want / m.n, MEAN)]
        fallback = "g's forward is the sum of x over the ranks of group (an all-reduce)"
        hint = next((h for value, h in candidates if close(got, value)), fallback)
        raise AssertionError(
            f"{who}: forward differs from the sum over the group {worst(got, want)}: {hint}"
        )
    with _guarded():
        y.backward(grad.clone())
    _check_grad(who, "x.grad", x.grad, grad, m.n, "backward must return (grad, None)")


def _check_indivisible(m: _Member, learner: ModuleType) -> None:
    """``from_linear`` on ``nn.Linear(IN_BAD, OUT)``: ValueError naming IN_BAD."""
    bad = nn.Linear(IN_BAD, OUT)
    what = f"from_linear(nn.Linear({IN_BAD}, {OUT}), group) with N={m.n}"
    hint = (
        f"raise ValueError when N does not divide in_features, naming the numbers and the "
        f"valid choices (e.g. 'in_features={IN_BAD} is not divisible by N={m.n}: choose N "
        f"dividing {IN_BAD}'), before any communication"
    )
    try:
        with _guarded():
            learner.RowParallelLinear.from_linear(bad, m.group)
    except ValueError as err:
        if str(IN_BAD) not in str(err):
            raise AssertionError(f"{what} raised ValueError({str(err)!r}): {hint}") from None
        return
    except (NotImplementedError, ForbiddenCall):
        raise
    except Exception as err:
        raise AssertionError(f"{what} raised {type(err).__name__} ({err}): {hint}") from err
    raise AssertionError(f"{what} returned a layer: {hint}")


def _row_worker(ctx, case: Case, group, cwd: str, module_name: str) -> list[torch.Tensor]:
    """One member of ``case``: checks 1 to 5; returns the outputs (one per reference)."""
    torch.set_num_threads(1)
    learner = _learner(cwd, module_name)
    m = _Member(ctx, group)
    outputs = [_check_layer(m, learner, _Reference(bias, ctx.device)) for bias in BIASES]
    _check_g(m, learner, ctx.device)
    _check_indivisible(m, learner)
    return outputs


def _check_equal(case: Case, results: list[list[torch.Tensor]]) -> None:
    """The output is replicated: every member's must be bitwise group rank 0's."""
    for j, outputs in enumerate(results[1:], start=1):
        for bias, a, b in zip(BIASES, results[0], outputs, strict=True):
            if not torch.equal(a, b):
                raise AssertionError(
                    f"{case.describe()}: nn.Linear({IN}, {OUT}, bias={bias}): group rank {j}'s "
                    "output is not bitwise equal to group rank 0's: every rank must return the "
                    "all-reduced tensor itself (then the bias), so that all hold the same bytes"
                )


# ----------------------------------------------------------------------------------------
# The grader, and a quick look for the notebook


def grade_row_parallel(
    module_name: str = "my_row_parallel",
    cases: Iterable[Case] = DEFAULT_CASES,
    *,
    world_size: int | None = None,
) -> None:
    """Chapter 6's graded exercise: ``module_name``'s RowParallelLinear and g, vs nn.Linear.

    On every case of ``cases`` (default :data:`~course_lib.grading.core.DEFAULT_CASES`: 2,
    3 and 4 ranks, then the subgroups (1, 2, 3) and (0, 2) of 4); ``world_size=N`` is
    short for ``cases=[Case(N)]``. Prints OK, or raises AssertionError naming the rank (in
    the group and global), the case and the mistake (NotImplementedError for the stub).
    """
    cases = [Case(world_size)] if world_size is not None else list(cases)
    ran = grade(
        _row_worker, cases, os.getcwd(), module_name,
        what=WHAT, module_name=module_name, hang_hint=HANG_HINT,
    )  # fmt: skip
    for case, results in ran:
        _check_equal(case, results)
    where = "; ".join(case.describe() for case, _ in ran)
    print(
        f"OK: {module_name}.RowParallelLinear matches nn.Linear({IN}, {OUT}) with and without "
        f"bias on every rank: weight = this rank's columns (only them), bias whole; output "
        f"(bitwise the same on every rank), x_shard.grad, weight.grad and bias.grad within "
        f"rtol={RTOL}, atol={ATOL}; ReduceFromTensorParallel sums in forward and is the "
        f"identity in backward; ValueError for in_features={IN_BAD}: {where}."
    )


def _try_worker(ctx, case: Case, group, cwd: str, module_name: str) -> dict[str, Any]:
    """One rank of :func:`try_row_parallel`: the largest differences, nothing checked."""
    torch.set_num_threads(1)
    learner = _learner(cwd, module_name)
    m, ref = _Member(ctx, group), _Reference(True, ctx.device)
    with _guarded():
        layer = learner.RowParallelLinear.from_linear(ref.given, m.group)
        x_shard = m.columns(ref.x, m.r).clone().requires_grad_()  # (B, T, IN / N)
        y = layer(x_shard)
        y.backward(ref.grad_out.clone())
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    pairs = {
        "output": (y, ref.y),
        "x_shard.grad": (x_shard.grad, m.columns(ref.grad_x, m.r)),
        "weight.grad": (getattr(weight, "grad", None), m.columns(ref.grad_w, m.r)),
        "bias.grad": (getattr(bias, "grad", None), ref.grad_b),
    }
    diffs = {}
    for name, (got, want) in pairs.items():
        if got is None or got.shape != want.shape:
            diffs[name] = "None" if got is None else f"shape {_shape(got)} != {_shape(want)}"
        else:
            diffs[name] = f"{(got.detach() - want).abs().max().item():.2e}"
    return {"weight": _shape(weight) if isinstance(weight, torch.Tensor) else "missing", **diffs}


def try_row_parallel(module_name: str = "my_row_parallel", world_size: int = 2) -> list[dict]:
    """Chapter 6's exercise: run the learner's layer once and print how far it is from nn.Linear.

    On ``world_size`` ranks, ``nn.Linear(12, 5)``: each rank's weight shape and the largest
    difference of its output, input gradient, weight gradient and bias gradient from the
    reference's. Nothing is asserted (that is :func:`grade_row_parallel`'s job); the stub
    raises NotImplementedError. Returns the per-rank rows it prints.
    """
    ((_, rows),) = grade(
        _try_worker, [Case(world_size)], os.getcwd(), module_name,
        what=WHAT, module_name=module_name, hang_hint=HANG_HINT,
    )  # fmt: skip
    for rank, row in enumerate(rows):
        diffs = ", ".join(f"{k} {v}" for k, v in row.items() if k != "weight")
        print(f"rank {rank}: weight {row['weight']}; largest |difference| from "
              f"nn.Linear({IN}, {OUT})'s: {diffs}")  # fmt: skip
    return rows
