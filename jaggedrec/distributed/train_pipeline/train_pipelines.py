"""TorchRec's train pipelines (``torchrec.distributed.train_pipeline``), without fx tracing.

``progress(dataloader_iter)`` trains on one batch and returns the model's output: with the
model in training mode, ``zero_grad``, ``losses, output = model(batch)``,
``torch.sum(losses).backward()``, ``optimizer.step()``; in eval mode the forward only. It
raises ``StopIteration`` once the data has ended and every batch it fetched has run (with
``execute_all_batches=False``: as soon as the data ends).

* ``TrainPipelineBase``: two stages; the next batch's copy to the device (a side stream on
  CUDA) runs beside the current batch's step.
* ``TrainPipelineSparseDist``: three stages; step i copies batch i+2 to the device, starts
  the sharded modules' input dists of batch i+1 (on a side stream on CUDA; as asynchronous
  collectives, which gloo runs on its own threads) and runs batch i.
* ``TrainPipelineSemiSync``: also looks batch i+1's embeddings up before batch i runs, with
  the weights batch i's update has not reached yet (see its docstring).

The sharded modules are found by walking the model (``_prefetch.Prefetcher``), and a batch's
KJTs by looking into the batch (``_batches.kjt_fields``); a module that receives a KJT the
pipeline did not send ahead distributes it itself, counted in ``fallbacks``.
"""

from __future__ import annotations

import abc
import contextlib
import warnings
from collections import deque
from typing import Any, Callable, Deque, Dict, Generic, Iterator, Optional, Tuple, TypeVar

import torch

from jaggedrec.distributed.train_pipeline._batches import batch_bytes, to_device, wait_for_batch
from jaggedrec.distributed.train_pipeline._prefetch import Prefetched, Prefetcher

In = TypeVar("In")
Out = TypeVar("Out")


class TrainPipeline(abc.ABC, Generic[In, Out]):
    """A training loop's step: ``progress(dataloader_iter)`` runs one batch, returns its output."""

    @abc.abstractmethod
    def progress(self, dataloader_iter: Iterator[In]) -> Out:
        ...

    def reset(self) -> None:
        """Forget the batches in flight; the next ``progress`` starts from the iterator anew."""


class _Slot:
    """A batch in the pipeline: on the device, its index, and its input dists sent ahead."""

    def __init__(self, batch: Any, index: int) -> None:
        self.batch, self.index = batch, index
        self.prefetched: Optional[Prefetched] = None
        self.looked_up = False


def _refuse(owner: str, **options: Tuple[Any, Any]) -> None:
    """TorchRec's options this pipeline does not implement: an error unless left at ``ok``."""
    for name, (value, ok) in options.items():
        if value != ok:
            raise NotImplementedError(f"{owner}: {name}={value!r} is not implemented in jaggedrec (only {ok!r})")


class _Pipeline(TrainPipeline[In, Out]):
    """What the three pipelines share: fetching and copying batches, the step, cleanup."""

    _depth = 1  # batches fetched before the first step
    _sends_ahead = False  # whether the pipeline sends input dists ahead (a CUDA stream for them)

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 execute_all_batches: bool = True,
                 custom_model_fwd: Optional[Callable[[In], Tuple[torch.Tensor, Out]]] = None,
                 enable_inplace_copy_batch: bool = False) -> None:
        _refuse(type(self).__name__, enable_inplace_copy_batch=(enable_inplace_copy_batch, False))
        self._model, self._optimizer = model, optimizer
        self._device = torch.device(device)
        self._execute_all_batches = execute_all_batches
        self._model_fwd = custom_model_fwd if custom_model_fwd is not None else model
        cuda = self._device.type == "cuda"
        self._memcpy_stream = torch.cuda.Stream(self._device) if cuda else None
        self._data_dist_stream = torch.cuda.Stream(self._device) if cuda and self._sends_ahead else None
        self._slots: Deque[_Slot] = deque()
        self._exhausted = False
        self._next_index = 0
        self._peak = (0, 0)
        self._prefetcher: Optional[Prefetcher] = None

    # --- what the user reads -------------------------------------------------------------
    @property
    def fallbacks(self) -> Dict[str, int]:
        """Per sharded module (fqn), how many times it distributed its input synchronously
        because the pipeline had not sent that KJT ahead (see ``_prefetch``)."""
        return dict(self._prefetcher.fallbacks) if self._prefetcher is not None else {}

    def memory_stats(self) -> Dict[str, int]:
        """The most batches the pipeline held at once, and their bytes then."""
        return {"peak_batches": self._peak[0], "peak_batch_bytes": self._peak[1]}

    def close(self) -> None:
        """Complete and drop every batch in flight and detach from the model's sharded
        modules (whose forward then distributes as without a pipeline)."""
        self.reset()
        if self._prefetcher is not None:
            self._prefetcher.detach()

    def reset(self) -> None:
        while self._slots:
            self._drop(self._slots.popleft())
        self._exhausted = False

    # --- the stages ----------------------------------------------------------------------
    def _enqueue(self, dataloader_iter: Iterator[In]) -> bool:
        """Fetch the next batch and copy it to the device; False at the end of the data."""
        if self._exhausted:
            return False
        try:
            batch = next(dataloader_iter)
        except StopIteration:
            self._exhausted = True
            return False
        self._slots.append(_Slot(to_device(batch, self._device, self._memcpy_stream), self._next_index))
        self._next_index += 1
        count = len(self._slots)
        if count >= self._peak[0]:
            self._peak = (count, sum(batch_bytes(s.batch) for s in self._slots))
        return True

    def _start(self, slot: _Slot) -> None:
        if self._prefetcher is not None and slot.prefetched is None:
            with self._on(self._data_dist_stream):
                # CUDA: the dist stream waits for the batch's copy and uses its memory
                wait_for_batch(slot.batch, self._memcpy_stream)
                slot.prefetched = self._prefetcher.start(slot.batch)

    def _advance(self, slot: _Slot) -> None:
        if self._prefetcher is not None:
            with self._on(self._data_dist_stream):
                self._prefetcher.advance(slot.prefetched)

    def _drop(self, slot: _Slot) -> None:
        if self._prefetcher is not None:
            self._prefetcher.release(slot.prefetched)
        slot.prefetched = None

    @staticmethod
    def _on(stream: Optional[torch.Stream]):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _check_end(self) -> None:
        if self._exhausted and not self._execute_all_batches:
            self.reset()
            self._exhausted = True
        if not self._slots:
            raise StopIteration

    def _run(self, slot: _Slot, between: Callable[[], None]) -> Out:
        """Batch ``slot``'s forward, ``between()``, then backward and step; the slot is
        dropped afterwards, also when any of them raises."""
        training = self._model.training
        try:
            if training:
                self._optimizer.zero_grad()
            wait_for_batch(slot.batch, self._memcpy_stream)
            if self._data_dist_stream is not None:
                torch.cuda.current_stream(self._device).wait_stream(self._data_dist_stream)
            if self._prefetcher is not None:
                self._prefetcher.serve(slot.prefetched)
            try:
                losses, output = self._model_fwd(slot.batch)
            finally:
                if self._prefetcher is not None:
                    self._prefetcher.serve(None)
            between()
            if training:
                torch.sum(losses, dim=0).backward()
                self._optimizer.step()
        finally:
            self._drop(slot)
            if self._slots and self._slots[0] is slot:
                self._slots.popleft()
        return output


class TrainPipelineBase(_Pipeline[In, Out]):
    """Two stages: the next batch's copy to the device (on CUDA, a side stream; on CPU a plain
    ``.to``) beside the current batch's forward, backward and optimizer step.

    Args:
        model: returns ``(losses, output)`` for a batch.
        optimizer: stepped after each backward (zeroed before each forward).
        device: where the batches go.
        execute_all_batches: run the batches already fetched when the data ends.
        custom_model_fwd: called instead of ``model`` for the forward.
        enable_inplace_copy_batch: only False.
    """

    def progress(self, dataloader_iter: Iterator[In]) -> Out:
        if not self._slots:
            self._enqueue(dataloader_iter)
        self._check_end()
        slot = self._slots[0]
        self._enqueue(dataloader_iter)  # the next batch's copy runs beside this step
        return self._run(slot, lambda: None)


class TrainPipelineSparseDist(_Pipeline[In, Out]):
    """Three stages, each step: batch i+2's copy to the device, the sharded modules' input
    dists of batch i+1, and batch i's forward, backward and optimizer step.

    Batch i+1's input dist starts before batch i's forward (its first collective, the ranks'
    agreement on the batch) and its exchange of ids is launched after that forward, so both
    run while batch i computes: on CUDA on a side stream, on gloo as asynchronous collectives.
    A bad batch (an id out of range on any rank) raises on every rank in the step that runs
    it. The sharded modules are found by walking the model, with no tracing; a module that
    receives a KJT the pipeline did not send ahead distributes it itself: see ``fallbacks``.

    Args:
        model, optimizer, device, execute_all_batches, custom_model_fwd: as ``TrainPipelineBase``'s.
        apply_jit: only False (no TorchScript).
        enqueue_batch_after_forward: copy batch i+2 after batch i's forward instead of before.
        verify_pickups: one small all-reduce per module and step checks that every rank's
            module took the dist sent ahead, or every rank's did not (a model that changes
            its KJT on some ranks only then raises on every rank instead of hanging); a rank
            that took the dist waits for it only with the module's output dist. False
            leaves it out.
        context_type, pipeline_postproc, dmp_collection_sync_interval_batches: accepted for
            TorchRec's call shape; there is no context class, no postproc to hoist without
            tracing, and no 2D sharding to sync.
        enable_inplace_copy_batch, free_features_storage_early, clear_data_dist_inputs: only False.
    """

    _depth = 2
    _sends_ahead = True

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 execute_all_batches: bool = True, apply_jit: bool = False, context_type: Any = None,
                 pipeline_postproc: bool = False,
                 custom_model_fwd: Optional[Callable[[In], Tuple[torch.Tensor, Out]]] = None,
                 dmp_collection_sync_interval_batches: Optional[int] = 1, enqueue_batch_after_forward: bool = False,
                 enable_inplace_copy_batch: bool = False, free_features_storage_early: bool = False,
                 clear_data_dist_inputs: bool = False, verify_pickups: bool = True) -> None:
        _refuse(type(self).__name__, apply_jit=(apply_jit, False),
                free_features_storage_early=(free_features_storage_early, False),
                clear_data_dist_inputs=(clear_data_dist_inputs, False))
        super().__init__(model, optimizer, device, execute_all_batches, custom_model_fwd, enable_inplace_copy_batch)
        self._enqueue_after_forward = enqueue_batch_after_forward
        self._prefetcher = Prefetcher(model, verify_pickups=verify_pickups)
        self._prefetcher.attach()

    def detach(self) -> torch.nn.Module:
        """Detach from the model (its sharded modules then distribute as without a pipeline)."""
        self._prefetcher.detach()
        return self._model

    def attach(self, model: Optional[torch.nn.Module] = None) -> None:
        if model is not None and model is not self._model:
            raise ValueError("attach: a pipeline stays with the model it was built for")
        self._prefetcher.attach()

    def _fill(self, dataloader_iter: Iterator[In]) -> None:
        while len(self._slots) < self._depth and self._enqueue(dataloader_iter):
            pass
        if self._slots:  # the first batch: its whole dist before its forward
            self._start(self._slots[0])
            self._advance(self._slots[0])

    def progress(self, dataloader_iter: Iterator[In]) -> Out:
        self._fill(dataloader_iter)
        self._check_end()
        slot = self._slots[0]
        following = self._slots[1] if len(self._slots) > 1 else None
        if following is not None:
            self._start(following)
        if not self._enqueue_after_forward:
            self._enqueue(dataloader_iter)

        def between() -> None:
            if self._enqueue_after_forward:
                self._enqueue(dataloader_iter)
            if following is not None:
                self._advance(following)

        return self._run(slot, between)


class TrainPipelineSemiSync(TrainPipelineSparseDist[In, Out]):
    """``TrainPipelineSparseDist`` that also looks batch i+1's embeddings up a step early, so
    that their output all-to-all runs during batch i's forward and backward. Opt-in: the
    looked-up embeddings are one update stale.

    Definition: let ``W_k`` be the sharded tables after the updates of batches ``0..k-1``.
    Step ``i`` first runs every sharded module on batch ``i+1``'s KJT with ``W_i`` (before
    batch ``i``'s forward), then batch ``i``'s forward (whose sharded modules return what
    step ``i-1`` looked up, with ``W_{i-1}``), backward and optimizer step. So batch ``k``
    (``k >= start_batch``) sees the tables without batch ``k-1``'s update; the rest of the
    model is not stale. Its gradient reaches the rows it looked up once, in its own
    backward (a fused optimizer applies it to the rows as they are then, ``W_k``). Batches
    before ``start_batch`` run as ``TrainPipelineSparseDist``'s. A module that receives a
    KJT other than the one sent ahead (a fallback) drops the early lookup and looks up
    with the current weights.

    Args:
        as ``TrainPipelineSparseDist``'s, and:
        start_batch: the first batch looked up early (TorchRec's default, 900).
        stash_gradients: only False.
        strict: raise (instead of warn) when the optimizer also steps the sharded modules'
            parameters: those updates, too, reach a batch's lookup one step late.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 execute_all_batches: bool = True, apply_jit: bool = False, start_batch: int = 900,
                 stash_gradients: bool = False, pipeline_postproc: bool = True,
                 custom_model_fwd: Optional[Callable[[In], Tuple[torch.Tensor, Out]]] = None, strict: bool = False,
                 dmp_collection_sync_interval_batches: Optional[int] = 1, enable_inplace_copy_batch: bool = False,
                 free_features_storage_early: bool = False, clear_data_dist_inputs: bool = False,
                 verify_pickups: bool = True) -> None:
        _refuse(type(self).__name__, stash_gradients=(stash_gradients, False))
        super().__init__(model, optimizer, device, execute_all_batches, apply_jit,
                         pipeline_postproc=pipeline_postproc, custom_model_fwd=custom_model_fwd,
                         dmp_collection_sync_interval_batches=dmp_collection_sync_interval_batches,
                         enable_inplace_copy_batch=enable_inplace_copy_batch,
                         free_features_storage_early=free_features_storage_early,
                         clear_data_dist_inputs=clear_data_dist_inputs, verify_pickups=verify_pickups)
        self._start_batch = start_batch
        self._check_optimizer(strict)

    def is_semi_sync(self) -> bool:
        """Whether the next batch to run was looked up early."""
        return bool(self._slots) and self._slots[0].looked_up

    def _check_optimizer(self, strict: bool) -> None:
        sharded = {id(p) for _, m in self._prefetcher.modules if m.fused_optimizer is None for p in m.parameters()}
        shared = any(id(p) in sharded for group in self._optimizer.param_groups for p in group["params"])
        if shared:
            message = ("TrainPipelineSemiSync: the optimizer also steps sharded embedding parameters; their updates "
                       "reach a batch's early lookup one step late, as the fused optimizers' do")
            if strict:
                raise ValueError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _look_ahead(self, slot: _Slot) -> None:
        if slot.index >= self._start_batch and not slot.looked_up:
            self._start(slot)
            with self._on(self._data_dist_stream):
                self._prefetcher.look_ahead(slot.prefetched)
            slot.looked_up = True

    def progress(self, dataloader_iter: Iterator[In]) -> Out:
        self._fill(dataloader_iter)
        self._check_end()
        slot = self._slots[0]
        self._look_ahead(slot)  # the first batch (index >= start_batch): looked up with W_0
        if not self._enqueue_after_forward:
            self._enqueue(dataloader_iter)
        following = self._slots[1] if len(self._slots) > 1 else None
        if following is not None:
            self._look_ahead(following)
            self._start(following)  # before start_batch: sent ahead only
        after = self._slots[2] if len(self._slots) > 2 else None
        if after is not None:
            self._start(after)

        def between() -> None:
            if self._enqueue_after_forward:
                self._enqueue(dataloader_iter)
            for s in list(self._slots)[1:3]:
                self._start(s)
                self._advance(s)

        return self._run(slot, between)
