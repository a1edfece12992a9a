"""Counts the torch ops and kernel launches of one pooled Triton backward on CPU, under
Triton's interpreter, with torch.profiler: the aten ops called from Python (an aten op inside
another aten op, or inside a kernel launch, is not counted again) and the launches.

    TRITON_INTERPRET=1 python count_ops.py [--length L] [--weighted] [--mean] [--vbe]

Prints one line per op name with its count, then the totals: every aten op, those that would
launch a CUDA kernel (not allocations, views, or a ``.to`` that copies nothing), and the
Triton launches. The shape is DLRM-like and
small (26 features of one table each, B=8) so that the interpreter finishes in seconds; the
op count does not depend on the sizes.
"""

import argparse
import collections
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

from jaggedrec.ops import pooled_triton  # noqa: E402
from jaggedrec.ops.feature_tables import FeatureTables  # noqa: E402
from jaggedrec.ops.op_args import OpBatch  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--length", type=int, default=1)
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--weighted", action="store_true")
parser.add_argument("--mean", action="store_true")
parser.add_argument("--vbe", action="store_true")
args = parser.parse_args()

num_tables, rows, dim, batch = 26, 100, 16, args.batch
tables = FeatureTables(tuple(t * rows * dim for t in range(num_tables)), (rows,) * num_tables, (dim,) * num_tables,
                       tuple(range(num_tables)), (int(args.mean),) * num_tables, num_tables)
gen = torch.Generator().manual_seed(0)
weights = torch.randn(num_tables * rows * dim, generator=gen)
lengths = torch.full((num_tables * batch,), args.length, dtype=torch.int64)
offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
values = torch.randint(0, rows, (int(offsets[-1]),), generator=gen)
psw = torch.rand(values.shape[0], generator=gen) if args.weighted else None
inverse = torch.randint(0, batch, (num_tables, batch + 2), generator=gen) if args.vbe else None
op_batch = OpBatch(values, offsets, psw, inverse)
grad_out = torch.randn(batch, num_tables * dim, generator=gen)  # one row per bag slot (VBE: summed per slot)

launches = collections.Counter()
run = interpreter.InterpretedFunction.run


def counted_run(self, *a, **k):
    name = getattr(self.fn, "__name__", "kernel")
    launches[name] += 1
    with torch.profiler.record_function("triton_launch::" + name):
        return run(self, *a, **k)


interpreter.InterpretedFunction.run = counted_run


def backward():
    return pooled_triton.triton_backward(grad_out, weights, op_batch, tables, True, False, True)


backward()  # warm caches (pass features, meta)
launches.clear()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    backward()

events = prof.events()
top = collections.Counter()
for event in events:
    if not event.name.startswith("aten::"):
        continue
    parent, nested = event.cpu_parent, False
    while parent is not None:
        if parent.name.startswith("aten::") or parent.name.startswith("triton_launch::"):
            nested = True
            break
        parent = parent.cpu_parent
    if not nested:
        top[event.name] += 1
for name, count in sorted(top.items(), key=lambda kv: (-kv[1], kv[0])):
    print(f"{count:4d}  {name}")
for name, count in sorted(launches.items()):
    print(f"{count:4d}  launch {name}")
# ops that launch no kernel on CUDA: allocations, views, and a .to() that copies nothing
NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::select", "aten::slice", "aten::view", "aten::reshape",
             "aten::unsqueeze", "aten::detach_", "aten::lift_fresh", "aten::alias", "aten::as_strided",
             "aten::expand"}
copying_to = sum(1 for e in events if e.name == "aten::to" and any(c.name == "aten::_to_copy" for c in e.cpu_children)
                 and not (e.cpu_parent is not None and e.cpu_parent.name.startswith(("aten::", "triton_launch::"))))
launching = sum(c for n, c in top.items() if n not in NO_KERNEL and n != "aten::to") + copying_to
print(f"aten ops: {sum(top.values())}; of them launching a kernel on CUDA: {launching}; "
      f"kernel launches: {sum(launches.values())}")
