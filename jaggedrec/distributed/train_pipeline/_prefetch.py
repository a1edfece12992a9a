"""How a train pipeline sends batches' KJTs ahead to the sharded modules, without tracing.

``Prefetcher`` walks the model for sharded collections (``ShardedCollection``) and attaches
itself to each (``set_input_source``). On the first batch it picks, per module, the first
KJT of the batch (``_batches.kjt_fields``, not variable-batch) whose keys hold all the
module's features, and the ranks agree on that choice (a module the ranks choose differently
for is not pipelined). For each later batch, ``start`` launches every chosen module's input
dist for its KJT (``InFlight``); the module's forward asks ``take`` for it.

``take`` hands the dist over only when the module receives that very KJT: the same object,
or one holding the same values, weights and lengths (offsets) tensors, not changed in place
since (their version counters). Anything else (the model filtered keys, remapped ids, ran a
feature processor, or calls the module twice in a step) is a fallback: the module
distributes its KJT itself, synchronously, as without a pipeline; ``fallbacks`` counts them
per module and the first of each module is warned about. The ranks check with one small
collective that they all took the same path (``comm.PickupCheck``; for modules on CUDA over
a gloo group, so that reading it does not wait for the GPU). A rank that took the dist reads
it only when its output dist completes, so it costs no wait of its own; a rank that did not
take it reads it at once: when every rank fell back it distributes again, and when some
rank took the dist it runs the same lookup and output dist, and every rank raises when it
waits for the output, instead of hanging.

The dists launched for a batch every rank runs in the same order, so their collectives
match; a dist nobody takes is completed (``InFlight.drop``) when its step ends.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor, as_keyed_jagged_tensor
from jaggedrec.distributed.comm import PickupCheck
from jaggedrec.distributed.shards import ShardedCollection
from jaggedrec.distributed.train_pipeline._batches import kjt_fields
from jaggedrec.distributed.types import Awaitable, LazyAwaitable

_WRAPPERS = ("_dmp_wrapped_module", "module")


def sharded_modules(model: torch.nn.Module) -> List[Tuple[str, ShardedCollection]]:
    """``[(fqn, module)]`` of every sharded collection in ``model``; the fqn without DMP's and
    DDP's wrapper prefixes, as the unwrapped model names it."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, ShardedCollection):
            parts = name.split(".")
            while len(parts) > 1 and parts[0] in _WRAPPERS:
                parts = parts[1:]
            out.append((".".join(parts), m))
    return out


def _versions(kjt: KeyedJaggedTensor) -> tuple:
    # a tensor's version counter is torch's only record of in-place changes
    return tuple(t._version if t is not None else -1 for t in _tensors(kjt))  # noqa: SLF001 - torch.Tensor's


def _tensors(kjt) -> tuple:
    return (kjt.values(), kjt.weights_or_none(), kjt.lengths_or_none(), kjt.offsets_or_none())


def _same(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype and a.device == b.device)


def same_kjt(a, b) -> bool:
    """Whether two KJTs hold the same keys and the same tensors (not copies of them)."""
    if a is b:
        return True
    if list(a.keys()) != list(b.keys()):
        return False
    (va, wa, la, oa), (vb, wb, lb, ob) = _tensors(a), _tensors(b)
    if not (_same(va, vb) and _same(wa, wb)):
        return False
    if la is not None and lb is not None:
        return _same(la, lb)
    return oa is not None and ob is not None and _same(oa, ob)


class _Entry:
    """One module's input sent ahead: the KJT, and its ``InFlight`` dist or, once a semi-sync
    pipeline has looked it up, the ``Awaitable`` output."""

    def __init__(self, kjt, ours: Optional[KeyedJaggedTensor], result) -> None:
        self.kjt, self.ours, self.result = kjt, ours, result
        self.versions = _versions(ours) if ours is not None else ()

    def unchanged(self, kjt) -> bool:
        ours = self.ours
        if ours is None or not (same_kjt(kjt, self.kjt) or same_kjt(kjt, ours)):
            return False
        return _versions(ours) == self.versions

    def drop(self) -> None:
        if isinstance(self.result, Awaitable):
            with torch.no_grad():
                self.result.wait()
        else:
            self.result.drop()
        self.result = None


class Prefetched:
    """The entries of one batch: module id -> ``_Entry``."""

    def __init__(self, entries: Dict[int, _Entry]) -> None:
        self.entries = entries
        self.taken: set = set()


class Prefetcher:
    """Sends each batch's KJTs ahead to the sharded modules of ``model`` (see the module doc).

    Args:
        model: the model, DMP-wrapped or not.
        verify_pickups: check with one small collective per module and step that every
            rank took (or did not take) the dist sent ahead; False trusts that the model
            treats its KJTs the same way on every rank.
        strict: raise instead of falling back.
    """

    def __init__(self, model: torch.nn.Module, verify_pickups: bool = True, strict: bool = False) -> None:
        self.modules = sharded_modules(model)
        self._fqn = {id(m): fqn for fqn, m in self.modules}
        self._by_id = {id(m): m for _, m in self.modules}
        self._verify, self._strict = verify_pickups, strict
        self._check_groups = self._host_groups() if verify_pickups else {}
        self._plan: Optional[Dict[int, str]] = None  # module id -> the batch field its KJT is in
        self._serving: Optional[Prefetched] = None
        self._lookahead = False
        self.fallbacks: Dict[str, int] = {}
        self._warned: set = set()

    def _host_groups(self) -> Dict[int, Tuple[Any, torch.device]]:
        """For modules on CUDA: a gloo group over the same ranks, so that reading the pickup
        check does not wait for the GPU's queued work (module id -> (group, cpu)). Made here,
        where every rank builds the pipeline: making a group is itself collective."""
        made: Dict[tuple, Any] = {}
        out = {}
        for _, m in self.modules:
            if m.device.type != "cuda" or not dist.is_initialized():
                continue
            ranks = tuple(dist.get_process_group_ranks(m.process_group or dist.group.WORLD))
            if ranks not in made:
                made[ranks] = dist.new_group(list(ranks), backend="gloo")
            out[id(m)] = (made[ranks], torch.device("cpu"))
        return out

    def attach(self) -> None:
        for _, m in self.modules:
            m.set_input_source(self)

    def detach(self) -> None:
        for _, m in self.modules:
            m.set_input_source(None)

    # --- which KJT each module gets ------------------------------------------------------
    def _choose(self, fields: List[Tuple[str, Any]]) -> Dict[int, str]:
        """Per module, the first field whose KJT holds all its features, agreed on by the ranks."""
        names = [name for name, _ in fields]
        plan = {}
        for fqn, m in self.modules:
            needed = set(m.input_feature_names())
            pick = -1
            for i, (_, kjt) in enumerate(fields):
                if not _is_vbe(kjt) and needed <= set(kjt.keys()):
                    pick = i
                    break
            group = m.process_group
            if group is not None or dist.is_initialized():
                flags = torch.tensor([pick, -pick], dtype=torch.int64, device=m.device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
                if int(flags[0]) != -int(flags[1]):
                    self._fall_back(fqn, "the ranks' batches do not carry its features in the same field, so it is "
                                         "not pipelined")
                    continue
            if pick >= 0:
                plan[id(m)] = names[pick]
        return plan

    def start(self, batch: Any) -> Prefetched:
        """Launch every chosen module's input dist for ``batch`` (on the device)."""
        fields = kjt_fields(batch)
        if self._plan is None:
            self._plan = self._choose(fields)
        by_name = dict(fields)
        entries = {}
        for fqn, m in self.modules:
            path = self._plan.get(id(m))
            if path is None:
                continue
            kjt, ours, missing = by_name.get(path), None, f"the batch has no KeyedJaggedTensor at '{path}'"
            if kjt is not None:
                try:
                    ours = as_keyed_jagged_tensor(kjt)
                except (ValueError, TypeError) as e:
                    missing = str(e)
            entries[id(m)] = _Entry(kjt, ours, m.start_input_dist(ours, missing))
        return Prefetched(entries)

    # --- the modules' side ---------------------------------------------------------------
    def serve(self, prefetched: Optional[Prefetched], lookahead: bool = False) -> None:
        """Make ``take`` hand out ``prefetched``'s entries (None: stop). ``lookahead``: the
        pipeline itself calls the modules on the KJTs it sent (no fallbacks, no checks)."""
        self._serving, self._lookahead = prefetched, lookahead

    def take(self, module: ShardedCollection, kjt: KeyedJaggedTensor):
        """Called by the module's forward: the dist (or output) sent ahead for ``kjt``, or None."""
        serving = self._serving
        if serving is None:
            return None  # called outside a pipeline step
        key = id(module)
        fqn = self._fqn.get(key, type(module).__name__)
        entry = serving.entries.pop(key, None)
        if entry is None:
            why = ("it was called again in the step; the pipeline sends one KJT per module and step ahead"
                   if key in serving.taken else "no KeyedJaggedTensor of the batch holds all its features")
            self._fall_back(fqn, why)
            return None
        serving.taken.add(key)
        if self._lookahead:
            return entry.result
        picked = entry.unchanged(kjt)
        if self._verify:
            group, device = self._check_groups.get(key, (module.process_group, module.device))
            check = PickupCheck(picked, group, device, fqn)
            # A rank whose KJT differs while another rank takes the dist sent ahead still runs the
            # taking ranks' collectives (the lookup and output dist of the dist sent ahead), so
            # that none waits alone; every rank then raises when it waits for the output.
            if picked or check.split():
                return _after(entry.result, check.raise_if_split)
        elif picked:
            return entry.result
        entry.drop()
        self._fall_back(fqn, "the KeyedJaggedTensor it received is not one the pipeline found in the batch (the "
                             "model changed it first: filtered keys, remapped ids, a feature processor?)")
        return None

    def _fall_back(self, fqn: str, why: str) -> None:
        if self._strict:
            raise RuntimeError(f"train pipeline: module '{fqn}' cannot be pipelined: {why}")
        self.fallbacks[fqn] = self.fallbacks.get(fqn, 0) + 1
        if fqn not in self._warned:
            self._warned.add(fqn)
            warnings.warn(f"train pipeline: module '{fqn}' distributes its input synchronously: {why}. "
                          f"The pipeline counts these fallbacks in its `fallbacks` dict", RuntimeWarning,
                          stacklevel=3)

    def look_ahead(self, prefetched: Prefetched) -> None:
        """Semi-sync: run each module now on the KJT sent ahead for it, with the weights as
        they are; the outputs (their output dists in flight) wait in ``prefetched`` for the
        model's call. An error (a rejected batch) is kept for that call to raise."""
        entries = [(key, entry) for key, entry in prefetched.entries.items() if entry.ours is not None]
        self.serve(prefetched, lookahead=True)
        # The lookup's backward runs a step later, after batch i's backward has updated the
        # rows in place (a fused optimizer) or the optimizer has stepped them: it must take
        # the weights and optimizer state as they are then, which torch's version check on
        # saved tensors would refuse. Kept as they are, they are read at backward time.
        try:
            with torch.autograd.graph.saved_tensors_hooks(_as_is, _as_is):
                for key, entry in entries:
                    flight = entry.result
                    try:
                        entry.result = self._by_id[key](entry.ours)
                    except (ValueError, TypeError):
                        entry.result = flight  # its wait raises the error again, in the batch's own step
                    prefetched.entries[key] = entry
        finally:
            self.serve(None)
            prefetched.taken.clear()

    # --- end of a step -------------------------------------------------------------------
    @staticmethod
    def advance(prefetched: Optional[Prefetched]) -> None:
        """Launch the exchanges of ``prefetched``'s dists (their agreements read)."""
        if prefetched is not None:
            for entry in prefetched.entries.values():
                if not isinstance(entry.result, Awaitable):
                    entry.result.advance()

    @staticmethod
    def release(prefetched: Optional[Prefetched]) -> None:
        """Complete and forget what nobody took."""
        if prefetched is None:
            return
        entries, prefetched.entries = prefetched.entries, {}
        for entry in entries.values():
            entry.drop()


class _Checked(LazyAwaitable):
    """A semi-sync lookup's output, ``check`` run once it is complete."""

    def __init__(self, inner: Awaitable, check) -> None:
        super().__init__()
        self._inner, self._check = inner, check

    def _wait_impl(self):
        out = self._inner.wait()
        self._check()
        return out


def _after(result, check):
    """``result`` (an ``InFlight`` or an ``Awaitable``) with ``check`` run after its output dist."""
    if isinstance(result, Awaitable):
        return _Checked(result, check)
    result.check = check
    return result


def _as_is(t):
    return t


def _is_vbe(kjt) -> bool:
    return bool(getattr(kjt, "variable_stride_per_key", lambda: False)())
