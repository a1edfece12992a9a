"""The arguments a real launch passes to each kernel, taken from the kernels' launch glue.

Triton builds a different kernel for an integer argument that equals 1 (it becomes a
constant) or is a multiple of 16 (the compiler is told so, and may vectorise or drop masks
on it), and for a pointer that is 16-byte aligned. A batch of 16384 bags gives multiples of
16 where a made-up 3 would not, and the loops' machine code differs between the two. So the
machine-code report does not guess these: :func:`launches` calls each glue function
(``kernels/*.py``: ``pooled_fwd``, ``quant_fwd``, ``sequence_fwd``, the atomic backward's)
on CPU tensors of a representative batch, with ``wrap_triton`` swapped for a recorder that
keeps the arguments instead of launching, and :func:`specialise` turns them into what
triton would build, with triton's own specialisation function.

The run-tile kernels (``rows_grad``, the fused step, the long-run sums) take pointers and
constexprs only; :func:`check_no_integers` says so for the report, so a new integer
argument there cannot go unspecialised unnoticed.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Tuple

import torch

# the dlrm preset's CUDA shape (benchmarks/presets.py): 26 one-key features, 16384 bags
FEATURES = 26
BATCH_SIZE = 16384


class _Recorder:
    """Stands in for ``wrap_triton(kernel)``: ``recorder[grid](*args, **kwargs)`` keeps the call."""

    def __init__(self, calls: Dict[str, dict], kernel):
        self.calls, self.kernel = calls, kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls[kernel_name(self.kernel)] = dict(zip(_fn(self.kernel).arg_names, args), **kwargs)
        return launch


def _fn(kernel):
    return kernel.fn if hasattr(kernel, "configs") else kernel  # an autotuner's jit function, or the jit one


def triton_config(kwargs: dict, num_warps: int):
    """The ``triton.Config`` a plain jit kernel's launch amounts to (its block sizes, its warps)."""
    import triton
    return triton.Config(dict(kwargs), num_warps=num_warps)


def kernel_name(kernel) -> str:
    """``module.function`` of a (jit or autotuned) kernel: two modules have a ``_rows_grad_atomic_kernel``."""
    fn = _fn(kernel)
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


@contextlib.contextmanager
def _recording(modules, direct=()):
    """Record the launches through ``wrap_triton`` in ``modules``, and of the ``(module, name)``
    kernels in ``direct``, which their glue launches without it."""
    calls: Dict[str, dict] = {}
    saved = [(m, "wrap_triton", m.wrap_triton) for m in modules] + [(m, n, getattr(m, n)) for m, n in direct]
    try:
        for m in modules:
            m.wrap_triton = lambda kernel: _Recorder(calls, kernel)
        for m, name in direct:
            setattr(m, name, _Recorder(calls, getattr(m, name)))
        yield calls
    finally:
        for m, name, original in saved:
            setattr(m, name, original)


def _meta(fields: int, dim: int, num_rows: int) -> torch.Tensor:
    meta = torch.zeros(FEATURES, fields, dtype=torch.int64)
    meta[:, 1], meta[:, 2] = dim, num_rows
    meta[:, 3] = torch.arange(FEATURES) * dim
    meta[:, 4] = torch.arange(FEATURES)
    return meta


def launches(dtype: str = "fp32", dim: int = 128, ids: str = "int64", weighted: bool = False,
             ids_per_bag: int = 1, batch_size: int = BATCH_SIZE) -> Dict[str, dict]:
    """``module.kernel`` (``" VBE"`` appended for the forward with inverse indices) -> {argument
    name: what its glue passes}, for ``FEATURES`` features of ``dtype`` tables of dim ``dim``,
    ``batch_size`` bags of ``ids_per_bag`` ``ids`` ids each, with per-id weights if ``weighted``."""
    from jaggedrec.kernels import hash_probe, pooled_bwd, pooled_fwd, pooled_fwd_short, quant_fwd, quant_fwd_short, sequence_fwd
    from jaggedrec.kernels.quant_fwd import QMETA_FIELDS
    from jaggedrec.ops import hash_probe as hash_probe_ops
    from jaggedrec.ops.op_args import OpBatch
    from jaggedrec.ops.quantized_triton import dim_alignment

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    index = {"int64": torch.int64, "int32": torch.int32}[ids]
    n = FEATURES * batch_size * ids_per_bag
    rows = 1000
    batch = OpBatch(torch.zeros(n, dtype=index), torch.arange(0, n + 1, ids_per_bag, dtype=index),
                    torch.ones(n) if weighted else None)
    meta = _meta(7, dim, rows)
    out = torch.empty(batch_size, FEATURES * dim)
    bad_ids = torch.zeros(FEATURES, dtype=torch.int64)
    weights = torch.empty(FEATURES * rows * dim, dtype=table)
    align = 16  # as the op layer plans it: the largest power of two up to 16 dividing the dims and offsets
    while dim % align:
        align //= 2
    with _recording([pooled_fwd, pooled_fwd_short, quant_fwd, quant_fwd_short, sequence_fwd, pooled_bwd],
                    direct=[(hash_probe, "hash_probe_pooled_kernel")]) as calls:
        pooled_fwd.pooled_fwd(weights, batch, meta, out, bad_ids, dim, align, batch_size)
        vbe = batch._replace(inverse_indices=torch.zeros(FEATURES, batch_size, dtype=torch.int64))
        with _renamed(calls, "pooled_fwd._pooled_fwd_kernel", "pooled_fwd._pooled_fwd_kernel VBE"):
            pooled_fwd.pooled_fwd(weights, vbe, meta, out, bad_ids, dim, align, batch_size)
        # quantized rows padded to 16 bytes (row_align=16, CUDA's default)
        buffers = [torch.empty(FEATURES * rows * (2 * dim + 16), dtype=torch.uint8) for _ in range(3)]
        qmeta = _meta(QMETA_FIELDS.value, dim, rows)
        quant_fwd.quant_fwd(buffers, batch, qmeta, out, bad_ids, dim, 16, dim_alignment([dim]))
        if dim <= quant_fwd_short.MAX_DIM:
            # short bags (the op's choice at one id per bag): a launch per storage type, then the
            # general kernel's pass over the longer bags (recorded under its own name)
            for storage in (1, 2, 3):
                with _renamed(calls, "quant_fwd_short._quant_fwd_short_kernel",
                              f"quant_fwd_short._quant_fwd_short_kernel {storage}"):
                    quant_fwd_short.quant_fwd_short(buffers[storage - 1], batch.values, batch.offsets,
                                                    batch.per_sample_weights, qmeta, out, bad_ids, dim, storage, 16,
                                                    dim_alignment([dim]), 1)
            with _renamed(calls, "quant_fwd._quant_fwd_kernel", "quant_fwd._quant_fwd_kernel SHORT"):
                quant_fwd.quant_fwd(buffers, batch, qmeta, out, bad_ids, dim, 16, dim_alignment([dim]), 1)
            pooled_fwd_short.pooled_fwd_short(weights, batch, meta, out, bad_ids, dim, align, batch_size, 1)
        if dtype == "fp32" and not weighted:
            # a hashed table per feature, buckets of 8 (the hash tables' default), one bag per program
            keys = torch.zeros(FEATURES * rows + 1, dtype=torch.int64)
            hash_meta = torch.zeros(FEATURES, 9, dtype=torch.int64)
            hash_meta[:, 1], hash_meta[:, 2] = dim, torch.arange(FEATURES) * dim
            # (weight offsets 0, output columns multiples of dim: the alignment is dim's, up to 4 floats)
            hash_probe_ops.probe_pooled_triton(keys, 8, weights, batch.values, batch.offsets, hash_meta, batch_size,
                                               FEATURES * dim, dim, min(align, 4))
        sequence_fwd.sequence_fwd(weights, batch._replace(per_sample_weights=None), meta,
                                  torch.empty(n * dim, dtype=table), bad_ids, batch_size, dim, align)
        parts = pooled_bwd.Contributions(torch.zeros(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int64),
                                         torch.zeros(n, dtype=torch.int64))
        grads = torch.empty(FEATURES * rows * dim)
        pooled_bwd.rows_grad_atomic(out, parts, batch, meta, grads, dim, align)
        pooled_bwd.psw_grad(out, weights, parts, batch, meta, torch.empty(n), dim, align)
        sequence_fwd.rows_grad_atomic(out, parts, torch.zeros(n, dtype=torch.int64), meta, grads, dim, align)
    return calls


@contextlib.contextmanager
def _renamed(calls, name, new_name):
    before = calls.pop(name, None)
    yield
    calls[new_name] = calls.pop(name)
    if before is not None:
        calls[name] = before


def specialise(kernel, args: dict) -> Tuple[Dict[str, str], Dict[str, object], List[str]]:
    """What triton builds for a launch of ``kernel`` with ``args``, by the function its launcher
    calls: each non-constexpr argument's type ("*fp32", "i32"), the constexprs (those passed,
    and integers of value 1, which triton makes constants), and the arguments it specialises
    as 16-aligned pointers or multiples of 16."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    types, constants, divisible = {}, {}, []
    for p in _fn(kernel).params:
        if p.name not in args:  # an autotune config's
            continue
        value = args[p.name]
        if p.is_constexpr:
            constants[p.name] = value
            continue
        kind, key = native_specialize_impl(BaseBackend, value, False, not p.do_not_specialize,
                                           not p.do_not_specialize_on_alignment)
        if kind == "constexpr":
            constants[p.name] = key
        else:
            types[p.name] = kind
            if BaseBackend.parse_attr(key):
                divisible.append(p.name)
    return types, constants, divisible


def check_no_integers(fn, types: Dict[str, str]) -> None:
    """Raise if ``fn`` has a non-constexpr argument that ``types`` gives an integer type: its
    launch glue is not recorded, so its value would be made up."""
    fn = getattr(fn, "fn", fn)
    ints = [p.name for p in fn.params if not p.is_constexpr and types.get(p.name, "*").startswith("i")]
    if ints:
        raise ValueError(f"{fn.__name__} takes integer arguments {ints}: record its launch glue in launch_args")
