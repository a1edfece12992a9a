"""The probe-and-gather kernel (kernels/hash_probe.py) under Triton's interpreter, on tiny
grids: pooled bags read straight from raw ids equal the torch path (look up, then
embedding_bag) and the collection's own eval forward, for hashed and static tables, SUM and
MEAN, absent ids (the fallback row, counted), empty bags, a key with no ids, a key the
collection does not read, int32 and int64 ids."""

import random

import pytest
import torch

import jaggedrec as jr
from jaggedrec.modules.hash_embedding_modules import HashEmbeddingBagCollection, HashTableOptions
from jaggedrec.ops import hash_probe
from jaggedrec.ops import hash_probe_torch as hp

pytestmark = pytest.mark.interpret

KEYS = ["a", "x", "b", "c"]  # x: read by no table


def tables():
    return [jr.EmbeddingBagConfig(name="h0", embedding_dim=5, num_embeddings=17, feature_names=["a"]),
            jr.EmbeddingBagConfig(name="s", embedding_dim=3, num_embeddings=6, feature_names=["c"],
                                  pooling=jr.PoolingType.MEAN),
            jr.EmbeddingBagConfig(name="h1", embedding_dim=20, num_embeddings=9, feature_names=["b"],
                                  pooling=jr.PoolingType.MEAN)]


def batch(rng, pool, id_dtype, B):
    lengths, values = [], []
    for k in KEYS:
        for _ in range(B):
            n = 0 if k == "x" else rng.choice([0, 1, 2, 3])
            lengths.append(n)
            values += [rng.randrange(6) if k == "c" else rng.choice(pool) for _ in range(n)]
    return jr.KeyedJaggedTensor(KEYS, torch.tensor(values, dtype=id_dtype), lengths=torch.tensor(lengths))


# 3 samples: every bag in one block of 32; 11: two blocks, the second partly empty, both
# holding bags of several keys
@pytest.mark.parametrize("id_dtype,B", [(torch.int64, 3), (torch.int32, 3), (torch.int64, 11)])
def test_probe_kernel_matches_torch_path(id_dtype, B):
    rng = random.Random(2)
    options = {"h0": HashTableOptions(bucket_size=4, unplaced="fallback"),
               "h1": HashTableOptions(bucket_size=4, eviction="lfu", unplaced="fallback")}
    model = HashEmbeddingBagCollection(tables(), options, backend="torch")
    pool = [rng.randrange(-2**31, 2**31) for _ in range(40)]
    for _ in range(4):  # place ids (training, torch path)
        model(batch(rng, pool, id_dtype, B))
    kernel = HashEmbeddingBagCollection(tables(), options, backend="triton")
    kernel.load_state_dict(model.state_dict())
    model.eval()
    kernel.eval()
    saw_fallback = False
    for _ in range(3):
        kjt = batch(rng, pool + [rng.randrange(2**31) for _ in range(5)], id_dtype, B)
        state, tabs = model.hash_state, model.probe_tables(KEYS)
        flat = next(iter(model.flat_weights.values())).detach()
        want, want_counts = hash_probe.probe_pooled_torch(state.keys, 4, flat, kjt.values(), kjt.offsets(), tabs, B,
                                                          28)
        meta = hash_probe.probe_meta(tabs, flat.device)
        got, got_counts = hash_probe.probe_pooled_triton(state.keys, 4, flat, kjt.values(), kjt.offsets(), meta, B,
                                                         28, 20)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(got_counts, want_counts)
        saw_fallback |= bool(want_counts.any())
        # the collections' eval forwards: the remapped KJT through the torch op, and the one launch
        before = {f: int(n) for f, n in kernel.fallback_counts().items()}
        ref = model(kjt).values()
        torch.testing.assert_close(kernel(kjt).values(), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ref, want, rtol=1e-6, atol=1e-6)
        after = {f: int(n) for f, n in kernel.fallback_counts().items()}
        assert after == {f: before[f] + int(want_counts[KEYS.index(f)]) for f in before}
    assert saw_fallback


def _direct_case(seed, bucket_size, dims, batch_size, max_len, id_dtype):
    """Tables laid out by hand (no collection): hashed ones sharing one pool of ids, each id
    placed in its own bucket where a slot is free (so the same id sits in neighbouring buckets
    of other tables), some absent (the fallback row); a static one; bags of 0 to ``max_len``."""
    rng = random.Random(seed)
    tabs, offset, column, buckets = [], 0, 0, 0
    for i, dim in enumerate(dims):
        hashed = i != 1  # the second key reads a static table
        num_buckets = rng.randint(1, 5)
        rows = num_buckets * bucket_size + 1 if hashed else 7
        tabs.append(hash_probe.KeyTable(offset, dim, column, rng.random() < 0.5, hashed,
                                        buckets if hashed else 0, num_buckets if hashed else 1,
                                        buckets * bucket_size if hashed else 0, rows - 1 if hashed else 0))
        buckets += num_buckets if hashed else 0
        offset, column = offset + rows * dim, column + dim
    keys = torch.full((buckets * bucket_size + 1,), torch.iinfo(torch.int64).min, dtype=torch.int64)
    pool = [rng.randrange(-2**31, 2**31) for _ in range(24)] + [0]  # 0 (placed last): what masked keys read as
    for t in tabs:
        for x in pool if t.hashed else []:
            b = int(hp.bucket_of(hp.mix(torch.tensor([x])), t.bucket_base, t.num_buckets)[0])
            free = [s for s in range(bucket_size) if keys[b * bucket_size + s] == torch.iinfo(torch.int64).min]
            if free and rng.random() < 0.8:
                keys[b * bucket_size + free[0]] = x
    lengths, values = [], []
    for t in tabs:
        for _ in range(batch_size):
            n = rng.randint(0, max_len) if max_len > 1 else 1
            lengths.append(n)
            values += [rng.randrange(7) if not t.hashed else rng.choice(pool) for _ in range(n)]
    offsets = torch.tensor([0] + lengths, dtype=id_dtype).cumsum(0).to(id_dtype)
    weights = torch.randn(offset + 3, generator=torch.Generator().manual_seed(seed))
    return keys, weights, torch.tensor(values, dtype=id_dtype), offsets, tabs, column


# The pipelined loop over positions: bags of one id (DLRM's), and of up to 9 (the pipeline's start
# and end over many positions); 21 samples per key, so the blocks of 16 bags straddle keys; dims
# that are multiples of 4 (16-byte rows promised) and not, one wider than a 128-wide tile (two
# column tiles); buckets of 1, 2 and 16 (probed through windows of 8 and 16 keys), int32 and int64 ids
@pytest.mark.parametrize("bucket_size,dims,max_len,id_dtype", [
    (8, (4, 8, 20), 1, torch.int64), (8, (4, 8, 20), 9, torch.int32), (1, (5, 3, 6), 4, torch.int64),
    (2, (132, 4, 8), 3, torch.int64), (16, (8, 3, 1), 6, torch.int32)])
def test_pipelined_probe_matches_the_torch_path(bucket_size, dims, max_len, id_dtype):
    keys, weights, values, offsets, tabs, total = _direct_case(7, bucket_size, dims, 21, max_len, id_dtype)
    want, want_counts = hash_probe.probe_pooled_torch(keys, bucket_size, weights, values, offsets, tabs, 21, total)
    align = hash_probe.probe_alignment(tabs)
    assert align == (4 if all(d % 4 == 0 for d in dims) else 1)
    got, got_counts = hash_probe.probe_pooled_triton(keys, bucket_size, weights, values, offsets,
                                                     hash_probe.probe_meta(tabs, "cpu"), 21, total, max(dims), align)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got_counts, want_counts)
    assert want_counts[0] > 0 and (want_counts[0] < (offsets[21] - offsets[0])), want_counts  # found and not


def test_probe_alignment_is_what_every_read_key_allows():
    t = hash_probe.KeyTable
    assert hash_probe.probe_alignment([t(0, 8, 0, False, True), t(64, 4, 8, False, False)]) == 4
    assert hash_probe.probe_alignment([t(0, 8, 0, False, True), t(66, 4, 8, False, False)]) == 1  # offset
    assert hash_probe.probe_alignment([t(0, 6, 0, False, True), t(48, 4, 6, False, False)]) == 1  # dim, column
    assert hash_probe.probe_alignment([t(0, 8, 0, False, True), t(3, 0, 5, False, False)]) == 4  # a key not read


BUILD = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from jaggedrec.kernels import hash_probe
fn = hash_probe.hash_probe_pooled_kernel
types = {"values_ptr": sys.argv[1], "offsets_ptr": "*i64", "keys_ptr": "*i64", "weight_ptr": "*fp32",
         "out_ptr": "*fp32", "meta_ptr": "*i64", "fallback_ptr": "*i64", "batch_size": "i32", "out_stride": "i32",
         "num_bags": "i32"}
sig = {n: types.get(n, "constexpr") for n in fn.arg_names}
bucket, align = int(sys.argv[2]), int(sys.argv[3])
consts = {(fn.arg_names.index("BUCKET_SIZE"),): bucket, (fn.arg_names.index("BLOCK_D"),): 64,
          (fn.arg_names.index("BLOCK_B"),): 16, (fn.arg_names.index("DIM_ALIGN"),): align,
          (fn.arg_names.index("WINDOW"),): max(bucket, 8)}
attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in types if types[n].startswith("*")}
k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
import subprocess, tempfile
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(k.asm["cubin"])
    f.flush()
    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
spills = sum(op in line for line in sass.splitlines() for op in (" STL", " LDL"))
print("target", k.asm["ptx"].split(".target")[1].split()[0], "sass lines", len(sass.splitlines()), "spills", spills,
      "triton", triton.__version__)
"""


@pytest.mark.parametrize("id_type,bucket,align", [("*i64", 8, 4), ("*i32", 8, 4), ("*i64", 1, 1)])
def test_probe_kernel_builds_for_sm90a(id_type, bucket, align):
    """The kernel compiles to sm_90a machine code (no GPU needed) with this venv's triton; the
    second lane (torch 2.11, triton 3.6) runs the same test."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", BUILD, id_type, str(bucket), str(align)], capture_output=True,
                          text=True, env=env,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "target sm_90a" in done.stdout, done.stdout
    assert "spills 0" in done.stdout, done.stdout
