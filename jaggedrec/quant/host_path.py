"""The quantized collection's eager CPU forward: a plain KJT (one bag per sample) in, the pooled
``[B, sum(dims)]`` fp32 out, with no work but what the batch needs.

The general path (``read_batch``, then the op) serves every case: compiled and traced graphs,
fake tensors, CUDA, VBE. On the CPU in eager mode most of its steps are either free or already
proven, so this path skips them, with the same results, bits and errors:

* the ids' range check (a pass over every id, the costliest check) is left to the pooling calls:
  torch's quantized ops refuse ids outside the rows they are given, and each call over one
  table gets that table's rows only; ids shifted into a block of tables are checked per
  table first (``quantized_torch.quantized_forward(check_ids=True)``);
* lengths and offsets are checked with the few ops their case needs, and the offsets the ops
  pool with are built once (given lengths: one cumsum; given both: compared, then the
  caller's serve);
* the ``[K+1]`` key starts are read once, for the checks and the ops alike;
* no bad-id counts, no dispatcher, no per-call dtype or layout work the batch does not need.

Whatever fails here is handed to ``validation.check_data``, which words the error (feature, id,
sample) exactly as the general path does.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from jaggedrec.modules import validation
from jaggedrec.modules.validation import FeatureSpec
from jaggedrec.ops import quantized_torch
from jaggedrec.ops.feature_tables import STORAGE_FP16, STORAGE_INT4, STORAGE_INT8
from jaggedrec.ops.quantized_plan import QuantPlan
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor

_PLAIN = torch.Tensor  # an eager CPU tensor's type; fake, functional and traced tensors are subclasses


def serves(kjt: object, buffers: Dict[int, torch.Tensor]) -> int:
    """B, the batch size, if :func:`pooled` can serve ``kjt`` (a KJT of eager real CPU
    tensors, one bag per sample: no VBE, no inverse indices, at least one bag) with
    ``buffers`` (storage type -> flat uint8 buffer: real CPU tensors too), else 0."""
    if type(kjt) is not KeyedJaggedTensor and not isinstance(kjt, KeyedJaggedTensor):
        return 0  # a torch.fx proxy, while tracing
    if torch.compiler.is_compiling() or kjt.variable_stride_per_key() or kjt.inverse_indices_or_none() is not None:
        return 0
    values, lengths, offsets = kjt.values(), kjt.lengths_or_none(), kjt.offsets_or_none()
    if type(values) is not _PLAIN or not values.is_cpu or (lengths is None and offsets is None) or not kjt.keys():
        return 0
    if (lengths is not None and type(lengths) is not _PLAIN) or (offsets is not None and type(offsets) is not _PLAIN):
        return 0
    int8 = buffers[STORAGE_INT8]
    if type(int8) is not _PLAIN or type(buffers[STORAGE_INT4]) is not _PLAIN or \
            type(buffers[STORAGE_FP16]) is not _PLAIN or not int8.is_cpu:
        return 0
    return kjt.stride()


def pooled(kjt: KeyedJaggedTensor, spec: FeatureSpec, plan: QuantPlan, buffers: Dict[int, torch.Tensor],
           validate: bool, batch: int) -> torch.Tensor:
    """``[B, sum(dims)]`` fp32: every feature of ``plan.tables`` pooled from ``buffers`` (storage
    type -> flat uint8 buffer), ``kjt`` (``batch`` = B bags per key, from :func:`serves`)
    checked as ``read_batch`` checks it."""
    values, weights = kjt.values(), kjt.weights_or_none()
    if not _static_ok(kjt, spec, values, weights, batch):
        validation.check_static(kjt, spec)  # raises, naming what is wrong
    offsets, starts, shortest = _offsets(kjt, spec, validate, batch)
    # every bag one id: N = K*B ids in K*B bags of at least one id each (None: ask the offsets)
    one_per_bag = None if shortest is None else shortest >= 1 and starts[-1] == offsets.shape[0] - 1
    if values.dtype != offsets.dtype:  # torch's quantized ops want one index dtype
        if values.dtype == torch.int64 or not validate or starts[-1] >= 2 ** 31:
            values, offsets = values.long(), offsets.long()
        else:  # int32 ids: their checked offsets run from 0 to N < 2**31, so they narrow exactly
            offsets = offsets.int()
    psw = None if weights is None else weights.float().contiguous()
    try:
        return quantized_torch.quantized_forward(buffers, values.contiguous(), offsets.contiguous(), psw, plan.tables,
                                                 starts, check_ids=validate, one_per_bag=one_per_bag, plan=plan)
    except RuntimeError as error:
        failure = error
    # outside the handler, so that the user's error does not come chained to the op's
    if validate:
        validation.check_data(kjt, spec)  # raises naming the feature, id and sample
    raise failure


_ID_DTYPES = (torch.int64, torch.int32)


def _static_ok(kjt: KeyedJaggedTensor, spec: FeatureSpec, values: torch.Tensor, weights: Optional[torch.Tensor],
               batch: int) -> bool:
    """Whether ``validation.check_static`` would pass a batch :func:`serves` took: its checks
    of dtypes and shapes for one bag per sample, in one expression (that function, general
    over VBE and compiling, costs several times this per forward). False sends the batch to
    it, to be refused in its words."""
    bags = len(kjt.keys()) * batch
    lengths, offsets = kjt.lengths_or_none(), kjt.offsets_or_none()
    return (values.dtype in _ID_DTYPES and values.dim() == 1
            and (weights is None if not spec.is_weighted else
                 weights is not None and weights.is_floating_point() and weights.shape == values.shape)
            and (lengths is None or (lengths.dim() == 1 and lengths.shape[0] == bags))
            and (offsets is None or (offsets.dim() == 1 and offsets.shape[0] == bags + 1)))


def _offsets(kjt: KeyedJaggedTensor, spec: FeatureSpec, validate: bool,
             batch: int) -> Tuple[torch.Tensor, List[int], Optional[int]]:
    """``[K*B+1]`` the offsets to pool with, ``[K+1]`` host ints, the first id of each key, and
    the shortest bag's length (None when not read); with ``validate``, lengths and offsets
    checked as ``validation.check_data`` checks them."""
    both = validate and kjt.has_unchecked_offsets()
    offsets = kjt.offsets() if both else kjt.lookup_offsets()
    starts = offsets[::batch].tolist()
    if not validate:
        return offsets, starts, None
    shortest = _shortest_if_sound(kjt, offsets, starts, both)
    if shortest is not None:
        if both:
            kjt.mark_offsets_checked()
        return offsets, starts, shortest
    validation.check_data(kjt, spec)  # raises, naming the feature and sample
    offsets = kjt.lookup_offsets()  # not reached with a bad batch; kept for a check stricter than check_data's
    return offsets, offsets[::batch].tolist(), None


def _shortest_if_sound(kjt: KeyedJaggedTensor, offsets: torch.Tensor, starts: List[int], both: bool) -> Optional[int]:
    """The shortest bag's length if the bags are sound, else None. Sound: no negative length,
    offsets from 0 to the id count (summed exactly: in int64, or from int64 offsets), and given
    offsets equal to the given lengths'."""
    if starts[0] != 0 or starts[-1] != kjt.values().shape[0]:
        return None
    lengths: Optional[torch.Tensor] = kjt.lengths_or_none()
    if lengths is None:
        lengths = offsets[1:] - offsets[:-1]
    # given both: the offsets are the lengths' running sum (offsets[0] is 0, checked above); one
    # cumsum where the steps take two slices and a subtraction. In the offsets' dtype, so that
    # equal compares like with like; a narrow sum that wrapped fails the lengths' sum below.
    elif both and not torch.equal(lengths.cumsum(0, dtype=offsets.dtype), offsets[1:]):
        return None
    shortest = int(lengths.min())
    if shortest < 0:
        return None
    # narrow offsets may have wrapped on their way to N: the lengths' own sum decides
    if offsets.dtype != torch.int64 and int(lengths.sum(dtype=torch.int64)) != starts[-1]:
        return None
    return shortest
