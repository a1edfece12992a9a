"""A kernel built for sm_90a without a GPU, and what ptxas gave it: ``triton.compile`` of one
variant (its argument types, constexprs and the arguments specialised as multiples of 16),
the registers, stack frame, local and shared memory from ``cuobjdump -res-usage``, ptxas -v's
spill bytes, and the theoretical occupancy those allow on Hopper. Used by ``codegen_report``
(the readings) and ``ptx_probe`` (the PTX sweep).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from typing import Dict, Optional, Sequence

os.environ.setdefault("JAGGEDREC_AUTOTUNE", "1")  # the tuned configs, whatever the caller's setting
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# Hopper's per-multiprocessor limits (the same on H100 and H200)
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
REGISTERS_PER_BLOCK = 65536
SUB_PARTITIONS = 4
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024
SHARED_GRANULARITY = 128
MULTIPROCESSORS = 132


def compile_kernel(kernel, types: Dict[str, str], constexprs: Dict[str, object], num_warps: int, arch: int = 90,
                   divisible: Optional[Sequence[str]] = None):
    """``triton.compile`` of ``kernel`` (jit or autotuned) for sm_``arch``, no GPU needed: argument
    ``types`` by name (the rest constexprs); the arguments in ``divisible`` specialised as 16-byte
    aligned pointers or multiples of 16, as triton's launcher does (None: every pointer, as torch
    allocates them)."""
    fn = jit_function(kernel)
    sig = {name: types.get(name, "constexpr") for name in fn.arg_names}
    consts = {(fn.arg_names.index(n),): value for n, value in constexprs.items()}
    if divisible is None:
        divisible = [n for n in fn.arg_names if types.get(n, "").startswith("*")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def jit_function(kernel):
    """The jit function of an autotuned kernel, or the kernel itself (a plain ``@triton.jit``
    one, whose ``fn`` is the Python function)."""
    return kernel.fn if hasattr(kernel, "configs") else kernel



def _tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def cuobjdump() -> str:
    return _tool("cuobjdump")


def resources(cubin: bytes) -> Dict[str, int]:
    """Registers, stack frame, local memory and static shared memory per thread/block, from
    ``cuobjdump -res-usage``. Spills land in the stack frame (STACK), not in LOCAL."""
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(\w+):(\d+)", text.split("Function", 1)[-1]))
    return {"registers": int(fields.get("REG", 0)), "stack": int(fields.get("STACK", 0)),
            "local": int(fields.get("LOCAL", 0)), "shared": int(fields.get("SHARED", 0))}


def ptxas_log(ptx: str) -> Dict[str, int]:
    """ptxas -v's figures for ``ptx``: registers, stack frame and spill store/load bytes. ptxas is
    run again as triton runs it (its binary for sm_90, its flags), since triton keeps no log."""
    import inspect
    import tempfile
    from triton.backends.nvidia import compiler
    ptxas = compiler.get_ptxas(90).path if hasattr(compiler, "get_ptxas") else _tool("ptxas")
    flags = ["--regAllocOptLevel=2"] if "regAllocOptLevel" in inspect.getsource(compiler.CUDABackend.make_cubin) else []
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(ptx)
        text = subprocess.run([ptxas, "-lineinfo", "-v", *flags, "--gpu-name=sm_90a", os.path.join(d, "k.ptx"), "-o",
                               os.path.join(d, "k.o")], capture_output=True, text=True, check=True).stderr
    figures = {"registers": r"Used (\d+) registers", "stack_frame": r"(\d+) bytes stack frame",
               "spill_stores": r"(\d+) bytes spill stores", "spill_loads": r"(\d+) bytes spill loads"}
    return {k: int(m.group(1)) if (m := re.search(pattern, text)) else 0 for k, pattern in figures.items()}


def occupancy(registers: int, shared: int, num_warps: int) -> Dict[str, float]:
    """Resident blocks and warps per multiprocessor, by the rules of ``cuda_occupancy.h`` (our
    reading of it, for sm_90). Registers: a warp's are allocated in units of 256 (registers per
    thread x 32, rounded up), and each of the SM's 4 sub-partitions gives its own quarter of the
    register file to its warps, so an SM holds floor(16384 / registers per warp) warps per
    sub-partition, times 4, and the blocks are those warps divided by the block's warps, rounded
    down. (Dividing the whole 64K file by a block's registers, as before, overcounts: 135
    registers at 2 warps a block gives 7 blocks that way and 6 by the rule.) A block whose warps,
    rounded up to a multiple of 4, would need more than 64K registers does not launch. Shared
    memory: each block holds its own plus 1 KB reserved, in 128-byte units."""
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    warps_by_registers = (REGISTERS_PER_SM // SUB_PARTITIONS // per_warp) * SUB_PARTITIONS
    by_registers = warps_by_registers // num_warps
    if per_warp * math.ceil(num_warps / SUB_PARTITIONS) * SUB_PARTITIONS > REGISTERS_PER_BLOCK or registers > 255:
        by_registers = 0
    by_warps = MAX_WARPS_PER_SM // num_warps
    per_block = math.ceil((shared + SHARED_RESERVED_PER_BLOCK) / SHARED_GRANULARITY) * SHARED_GRANULARITY
    by_shared = SHARED_PER_SM // per_block
    blocks = max(0, min(MAX_BLOCKS_PER_SM, by_registers, by_warps, by_shared))
    return {"blocks": blocks, "warps": blocks * num_warps, "occupancy": blocks * num_warps / MAX_WARPS_PER_SM}

