"""Float64 references of the fused optimizers FBGEMM steps only on GPU (its formulas, as
``jaggedrec.optim.fused`` gives them), shared by the collections' fused-optimizer tests."""

from jaggedrec import optim


def reference_step(o, lr, t, w, g, s, touched):
    """The new rows of the touched rows ``w`` (float64, ``[n, D]``) with summed gradients
    ``g``, FBGEMM's formulas; ``s``: the table's state (``m``, ``v`` ``[rows, D]``, ``sum_sq``
    ``[rows]``), updated at ``touched``."""
    if isinstance(o, optim.Adagrad):
        g = g + o.weight_decay * w
        s["m"][touched] += g.square()
        return w - lr * g / (s["m"][touched].sqrt() + o.eps)
    if isinstance(o, optim.LarsSGD):
        weight_norm = w.norm(dim=1, keepdim=True)
        scale = lr * o.eta * weight_norm / (g.norm(dim=1, keepdim=True) + o.weight_decay * weight_norm)
        s["m"][touched] = o.momentum * s["m"][touched] + scale * (g + o.weight_decay * w)
        return w - s["m"][touched]
    b1, b2 = o.betas
    if isinstance(o, optim.LAMB):  # and partial row-wise LAMB
        s["m"][touched] = b1 * s["m"][touched] + (1 - b1) * g
        if isinstance(o, optim.PartialRowWiseLAMB):
            s["sum_sq"][touched] = b2 * s["sum_sq"][touched] + (1 - b2) * g.square().mean(1)
            v_hat = (s["sum_sq"][touched] / (1 - b2 ** t)).unsqueeze(1)
        else:
            s["v"][touched] = b2 * s["v"][touched] + (1 - b2) * g.square()
            v_hat = s["v"][touched] / (1 - b2 ** t)
        direction = s["m"][touched] / (1 - b1 ** t) / (v_hat.sqrt() + o.eps) + o.weight_decay * w
        ratio = w.norm(dim=1, keepdim=True) / direction.norm(dim=1, keepdim=True)
        return w - lr * ratio * direction
    # partial row-wise Adam
    s["m"][touched] = b1 * s["m"][touched] + (1 - b1) * g
    s["sum_sq"][touched] = b2 * s["sum_sq"][touched] + (1 - b2) * g.square().mean(1)
    v_hat = s["sum_sq"][touched] / (1 - b2 ** t)
    return w - lr * (s["m"][touched] / (1 - b1 ** t) / (v_hat.sqrt() + o.eps).unsqueeze(1) + o.weight_decay * w)
