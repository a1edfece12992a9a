"""Route (a) in isolation: an LRU stamp of 65k skewed slots into a 400k-slot int64 array after
the key check of the same slots, keys and last_step apart (sep) or side by side in one [S, 2]
storage (inter, and chunks of 4k/8k/16k ids: check then stamp a chunk at a time), with the
caches flushed by FLUSH float32 elements between calls (4M: the arrays stay in L3; 30M: they
do not). One thread, thread CPU time, medians of 30.

    python micro_stamp.py FLUSH
"""
import torch, time, statistics, sys
torch.set_num_threads(1)
S=400_000; n=65_000
last=torch.zeros(S+1,dtype=torch.int64)
keys=torch.randint(-2**62,2**62,(S+1,))
pair=torch.stack([keys,last],1).contiguous()
pk, pl = pair.select(1,0), pair.select(1,1)
big=torch.zeros(int(sys.argv[1]))
g=torch.Generator().manual_seed(0)
idx=torch.randperm(S,generator=g)[(torch.rand(n,generator=g).pow(3)*S).long()]
ids=keys[idx]
step=torch.tensor([5])
def sep():
    f=keys.index_select(0,idx)==ids
    last.index_copy_(0,idx,step.expand(n))
def inter():
    f=pk.index_select(0,idx)==ids
    pl.index_copy_(0,idx,step.expand(n))
def chunked(c):
    def f():
        out=torch.empty(n,dtype=torch.bool)
        for s in range(0,n,c):
            i=idx[s:s+c]
            torch.eq(pk.index_select(0,i),ids[s:s+c],out=out[s:s+c])
            pl.index_copy_(0,i,step.expand(i.numel()))
    return f
def chunked_sep(c):
    def f():
        out=torch.empty(n,dtype=torch.bool)
        for s in range(0,n,c):
            i=idx[s:s+c]
            torch.eq(keys.index_select(0,i),ids[s:s+c],out=out[s:s+c])
            last.index_copy_(0,i,step.expand(i.numel()))
    return f
F={'sep':sep,'inter':inter,'ch4k':chunked(4096),'ch8k':chunked(8192),'ch16k':chunked(16384),'chsep8k':chunked_sep(8192)}
T={k:[] for k in F}
for _ in range(30):
    for k,f in F.items():
        big.add_(1); t0=time.thread_time(); f(); T[k].append(time.thread_time()-t0)
for k,v in T.items(): print(k, round(statistics.median(v)*1e3,3))
