"""The kernel variants the library launches for one workload (table dtype, dim, id type, per-id
weights): each autotune config and each switch the workload can set, with the argument types
and constexprs a real launch passes (``launch_args``). ``codegen_report`` builds and reads them.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import launch_args  # beside this script
from cubin import jit_function

QUANT_STORAGE = {1: "INT8", 2: "INT4", 3: "FP16"}


@dataclasses.dataclass
class Variant:
    kernel: str  # a short name: fwd, rows_grad, long_runs, fused, rows_grad_atomic, psw_grad, quant_fwd
    label: str  # the switches and config that make it
    fn: object  # the jit function
    types: Dict[str, str]  # argument name -> triton type ("*fp32", "i32")
    constexprs: Dict[str, object]
    num_warps: int
    loop: Optional[str] = None  # what its innermost loop does, when the bound applies to it
    row_bytes: float = 4  # bytes per element of the rows the loop gathers (INT4: 0.5)
    divisible: Optional[Tuple[str, ...]] = None  # arguments specialised as multiples of 16 (None: the pointers)
    storage: Optional[int] = None  # the quantized forwards: the storage type whose loop is read
    persistent: bool = False  # its loop walks blocks of bags (one round trip per block is the bound)

    def row_loads_per_step(self, load_bytes: int) -> int:
        """Row-load instructions per thread in one iteration of the source loop: its tile of
        ``rows x BLOCK_D`` elements over the program's threads, ``load_bytes`` at a time."""
        c = self.constexprs
        # a persistent short-bag forward's iteration loads SHORT rows of each of its BLOCK_B bags
        rows = c.get("BLOCK_B", c.get("BLOCK_U", c.get("BLOCK_Q", 1))) * c.get("UNROLL", 1)
        if self.persistent:
            rows *= c.get("SHORT", 1)
        return max(1, int(rows * c["BLOCK_D"] * self.row_bytes) // (32 * self.num_warps * max(load_bytes, 1)))



def argument_types(dtype: str = "fp32", ids: str = "int64"):
    """The kernels' argument types for ``dtype`` tables and ``ids`` ids: (forward, run-tile kernels,
    fused step, long-run sums, contribution kernels, table pointer type)."""
    table, index = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}[dtype], {"int64": "*i64", "int32": "*i32"}[ids]
    f32, i64 = "*fp32", "*i64"
    fwd = {"weights_ptr": table, "values_ptr": index, "offsets_ptr": index, "psw_ptr": f32, "inverse_ptr": i64,
           "meta_ptr": i64, "out_ptr": f32, "bad_ids_ptr": i64, "batch_size": "i32", "bag_stride": "i32",
           "out_stride": "i32", "num_features": "i32"}
    runs = {n: i64 for n in ["num_runs_ptr", "run_start_ptr", "run_row_ptr", "run_feature_ptr", "item_offset_ptr",
                             "long_rank_ptr", "meta_ptr"]}
    runs.update(grad_out_ptr=f32, item_scale_ptr=f32, long_sums_ptr=f32)
    fused = dict(runs, weights_ptr=table, state1_ptr=f32, state2_ptr=f32, hparams_ptr=f32, step_ptr=i64)
    long_runs = dict(grad_out_ptr=f32, num_long_ptr=i64, long_runs_ptr=i64, run_start_ptr=i64, run_feature_ptr=i64,
                     item_offset_ptr=i64, item_scale_ptr=f32, meta_ptr=i64, long_sums_ptr=f32)
    contrib = dict(grad_out_ptr=f32, grad_stride="i32", rows_ptr=i64, contrib_feature_ptr="*i32",
                   bag_of_value_ptr=i64, offsets_ptr=index, meta_ptr=i64, num_contributions="i32",
                   num_values="i32", batch_size="i32", max_dim="i32")
    return fwd, runs, fused, long_runs, contrib, table


def _alignment(dim: int) -> int:
    # as the op plans it for one table (or several of the same dim): the largest power of two
    # up to 16 dividing the dim (the tables' offsets are multiples of their dims)
    alignment = 16
    while dim % alignment:
        alignment //= 2
    return alignment


def optimizer_codes(pooled_fused) -> List[int]:
    """Every fused optimizer code the kernel module names (its upper-case integer constants)."""
    return sorted({v for k, v in vars(pooled_fused).items() if k.isupper() and type(v) is int and v > 0})


def workload_variants(dtype: str = "fp32", dim: int = 128, ids: str = "int64", weighted: bool = False,
                      legacy: Optional[bool] = None, batch_size: int = launch_args.BATCH_SIZE) -> List[Variant]:
    """Every variant the library launches for tables of ``dtype`` and ``dim`` with ``ids``
    ids: the forward (plain and VBE; the short-bag forward, persistent, and its pass for long
    bags), the quantized forward (INT8, INT4, FP16 rows; the short-bag one per storage type,
    and the general one's pass for long bags), the hash tables' probe-and-gather, the
    deterministic backward (dense and compact gradients, and the long runs' sums), the fused
    step for each optimizer, and the atomic backward; each at every autotune config. The
    kernels with a recorded launch glue (``launch_args``) are built with its arguments for a
    batch of ``batch_size`` bags; the run-tile kernels take only pointers. ``legacy`` sets
    LEGACY_LOOPS (None: the kernels' default, False)."""
    from jaggedrec.kernels import (hash_probe, pooled_bwd, pooled_fused, pooled_fwd, pooled_fwd_short, quant_fwd,
                                   quant_fwd_short, row_runs, sequence_fwd)
    from jaggedrec.kernels.common import block_d

    fwd, runs, fused, long_runs, contrib, table = argument_types(dtype, ids)
    dims = dict(BLOCK_D=block_d(dim), DIM_ALIGN=_alignment(dim))
    switch = {"LEGACY_LOOPS": bool(legacy)}
    recorded = launch_args.launches(dtype, dim, ids, weighted, batch_size=batch_size)
    out: List[Variant] = []

    def add(kernel, fn, types, constexprs, loop=None, row_bytes=4, glue=None, storages=(None,), persistent=False):
        jit = jit_function(fn)
        params = {p.name for p in jit.params if p.is_constexpr}
        divisible = None
        configs = getattr(fn, "configs", None)
        if glue is not None:  # the launch's own arguments: types, constants, multiples of 16
            types, passed, divisible = launch_args.specialise(fn, recorded[glue])
            if configs is None:  # a plain jit kernel: its launch passes the block sizes and warps
                tuned = {k: passed.pop(k) for k in list(passed) if k.startswith("BLOCK_") and k != "BLOCK_D"}
                configs = [launch_args.triton_config(tuned, recorded[glue].get("num_warps", 4))]
            constexprs = dict(passed, **constexprs)  # the switches this report sets over the glue's
            divisible = tuple(divisible)
        else:
            launch_args.check_no_integers(fn, types)
        shown = {k: v for k, v in constexprs.items() if k in ("HAS_PSW", "HAS_INVERSE", "DENSE", "HAS_SCALE",
                                                              "OPTIMIZER", "BLOCK_F", "SHORT", "BUCKET_SIZE")}
        for config in configs:
            full = dict(dims, ROW_STRIDE=dim, ONE_TILE=dim <= dims["BLOCK_D"], **constexprs)
            full = {k: v for k, v in dict(full, **switch).items() if k in params}
            full.update(config.kwargs)
            if getattr(fn, "keep", None) is not None and not fn.keep(config, full):
                continue  # a config the kernel never launches with these arguments (tuning.autotune's keep)
            for storage in storages:
                what = [QUANT_STORAGE[storage]] if storage else []
                label = " ".join(what + [f"{k}={v}" for k, v in shown.items()]
                                 + [f"{k}={v}" for k, v in config.kwargs.items()] + [f"warps={config.num_warps}"])
                bytes_ = {1: 1, 2: 0.5, 3: 2}[storage] if storage else row_bytes
                out.append(Variant(kernel, label, fn, types, full, config.num_warps, loop, bytes_, divisible, storage,
                                   persistent))

    elem = 2 if dtype in ("fp16", "bf16") else 4
    add("fwd", pooled_fwd._pooled_fwd_kernel, fwd, dict(HAS_PSW=weighted, HAS_INVERSE=False), "gather", elem,
        glue="pooled_fwd._pooled_fwd_kernel")
    # VBE: each output row reads its bag through the inverse index
    add("fwd", pooled_fwd._pooled_fwd_kernel, fwd, dict(HAS_PSW=weighted, HAS_INVERSE=True), "gather", elem,
        glue="pooled_fwd._pooled_fwd_kernel VBE")
    # the quantized forward: one kernel, a loop per storage type, each read
    add("quant_fwd", quant_fwd._quant_fwd_kernel, {}, dict(HAS_PSW=weighted), "gather",
        glue="quant_fwd._quant_fwd_kernel", storages=(1, 2, 3))
    for dense in (True, False):
        add("rows_grad", row_runs._rows_grad_kernel, dict(runs, dest_ptr="*fp32"),
            dict(DENSE=dense, HAS_SCALE=weighted), "runs")
    add("long_runs", row_runs._long_run_sums_kernel, long_runs, dict(HAS_SCALE=weighted), "long runs")
    for optimizer in optimizer_codes(pooled_fused):
        add("fused", pooled_fused._fused_update_kernel, fused, dict(OPTIMIZER=optimizer, HAS_SCALE=weighted), "runs")
    add("rows_grad_atomic", pooled_bwd._rows_grad_atomic_kernel, {}, dict(HAS_PSW=weighted),
        glue="pooled_bwd._rows_grad_atomic_kernel")
    if weighted:
        add("psw_grad", pooled_bwd._psw_grad_kernel, {}, {}, glue="pooled_bwd._psw_grad_kernel")
    # the EmbeddingCollection's forward (rows out in the tables' dtype) and its atomic backward
    add("seq_fwd", sequence_fwd._sequence_fwd_kernel, {}, {}, "gather", elem,
        glue="sequence_fwd._sequence_fwd_kernel")
    add("seq_grad_atomic", sequence_fwd._rows_grad_atomic_kernel, {}, {}, glue="sequence_fwd._rows_grad_atomic_kernel")
    # batches of about one id per bag: the persistent short-bag forwards (SHORT ids per bag pipelined,
    # 1 at the workload's one id per bag, 2 as the op layer picks up to two), and their passes for the
    # longer bags: pooled_fwd_short's own kernel, and the general quantized kernel launched with SHORT
    if dim <= pooled_fwd_short.MAX_DIM:
        for short in (1, 2):
            add("fwd_short", pooled_fwd_short._pooled_fwd_short_kernel, {}, dict(HAS_PSW=weighted, SHORT=short),
                "gather", elem, glue="pooled_fwd_short._pooled_fwd_short_kernel", persistent=True)
        add("fwd_long_bags", pooled_fwd_short._long_bags_kernel, {}, dict(HAS_PSW=weighted), "gather", elem,
            glue="pooled_fwd_short._long_bags_kernel")
        for storage in (1, 2, 3):
            for short in (1, 2):
                add("quant_fwd_short", quant_fwd_short._quant_fwd_short_kernel, {}, dict(HAS_PSW=weighted, SHORT=short),
                    "gather", {1: 1, 2: 0.5, 3: 2}[storage], glue=f"quant_fwd_short._quant_fwd_short_kernel {storage}",
                    persistent=True)
                out[-1].storage = storage
                out[-1].label = f"{QUANT_STORAGE[storage]} {out[-1].label}"
        add("quant_fwd", quant_fwd._quant_fwd_kernel, {}, dict(HAS_PSW=weighted), "gather",
            glue="quant_fwd._quant_fwd_kernel SHORT", storages=(1, 2, 3))
    # hashed tables: probe the bucket and gather the row, one bag per program (fp32 tables, unweighted)
    if dtype == "fp32" and not weighted:
        add("hash_probe", hash_probe.hash_probe_pooled_kernel, {}, {}, "probe", glue="hash_probe.hash_probe_pooled_kernel")
    return out

