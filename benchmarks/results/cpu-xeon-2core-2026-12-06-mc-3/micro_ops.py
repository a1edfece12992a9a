"""Single ops at the remap's sizes (65k ids, 400k slots, 2,300 picked positions): gathers
(index_select, take, [], and index_select from a stride-2 key column), scatters (index_copy_, put_, and the 65k-slot LRU stamp both ways), masked_select/nonzero, where vs
masked_fill. One thread, thread CPU time, medians of 50.

    python micro_ops.py
"""
import torch, time, statistics
torch.set_num_threads(1)
S=400_000; n=65_000
keys=torch.randint(-2**62,2**62,(S+1,))
words=torch.randint(-2**62,2**62,(50_000,))
g=torch.Generator().manual_seed(0)
idx=torch.randperm(S,generator=g)[(torch.rand(n,generator=g).pow(3)*S).long()]
bidx=idx//8
small=torch.randint(0,n,(2300,),generator=g)
dst=torch.zeros(n,dtype=torch.int64); src=torch.ones(2300,dtype=torch.int64)
mask=torch.rand(n,generator=g)<0.05
last=torch.zeros(S+1,dtype=torch.int64); step=torch.tensor([5])  # the LRU stamp
pair=torch.stack([keys,torch.zeros_like(keys)],1)  # keys beside last_step (route (a)): a stride-2 key column
F={'index_select':lambda: keys.index_select(0,idx),'pair_index_select':lambda: pair.select(1,0).index_select(0,idx),'take':lambda: keys.take(idx),'getitem':lambda: keys[idx],
   'w_index_select':lambda: words.index_select(0,bidx),'w_take':lambda: words.take(bidx),
   's_index_copy_':lambda: dst.index_copy_(0,small,src),'s_put_':lambda: dst.put_(small,src),
   's_index_select':lambda: dst.index_select(0,small),'s_take':lambda: dst.take(small),
   'masked_select':lambda: dst.masked_select(mask),'nonzero':lambda: mask.nonzero(),
   'where':lambda: torch.where(mask,idx,5), 'masked_fill':lambda: idx.masked_fill(mask,5),
   'stamp_index_copy_':lambda: last.index_copy_(0,idx,step.expand(n)), 'stamp_put_':lambda: last.put_(idx,step.expand(n))}
T={k:[] for k in F}
for _ in range(50):
    for k,f in F.items():
        t0=time.thread_time(); f(); T[k].append(time.thread_time()-t0)
for k,v in T.items(): print(f"{k:16s} {statistics.median(v)*1e3:.4f}")
