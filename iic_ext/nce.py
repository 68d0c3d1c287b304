"""Memory-bank contrast of IIC (CMC-style NCE with an intra-negative bank) and its losses.

:class:`NCEAverage` keeps the original's buffers (``params``, ``memory_l``, ``memory_ab``,
``memory_neg``) so an original ``contrast`` state dict loads with ``strict=True``, and returns what
the original ``lib/NCEAverage.py`` returns for the same banks and indices. The scores come from one
fused op (:func:`iic_ext.ops.iic_scores`) and the three bank updates from :func:`iic_ext.ops.bank_update_`.
For training with the softmax loss, :meth:`NCEAverage.softmax_losses` goes one step further: the loss
and its gradient in one pass (:func:`iic_ext.ops.iic_softmax_loss`).

The trainer does not call :meth:`NCEAverage.forward`: its objective
(:class:`iic_ext.objectives.MemoryObjective`) scores with :meth:`NCEAverage.scores` or the fused loss and
updates the banks with :meth:`NCEAverage.update` after the optimiser step. ``forward`` keeps the
original's API for code ported from it: it updates the banks in place before the caller's backward,
and only for that order the backward needs the banks as they were (``_Undo`` records the changed rows'
old-minus-new values, O(B D), instead of a copy of the sampled rows, O(B K D)).
"""
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .ops import nce as nce_ops
from .ops._library import HAS_C

log = logging.getLogger(__name__)

_EPS = 1e-7


class _Undo:
    """The rows one forward's bank update changed, so that its backward sees the banks as they were."""

    def __init__(self, owner):
        self.owner = owner
        self.generation = None
        self.rows = None  # sorted unique y, Tensor[U]
        self.deltas = None  # (old - new) rows per bank, Tensor[U, D] each (None for an absent bank)

    def record(self, rows, deltas, generation):
        self.rows, self.deltas, self.generation = rows, deltas, generation


class _ContrastScores(torch.autograd.Function):
    """``iic_scores`` whose backward uses the banks as they were at forward time.

    The forward updates rows y of the banks in place right after the scores (as the original does);
    instead of keeping a copy of the sampled rows (O(B K D)), the backward runs on the current banks
    and adds the contribution of the changed rows' old-minus-new values (O(B D)).
    """

    @staticmethod
    def forward(ctx, l, ab, bank_l, bank_ab, bank_neg, idx, inv_t, undo):
        out_l, out_ab = nce_ops.iic_scores(l, ab, bank_l, bank_ab, bank_neg, idx, inv_t)
        ctx.banks = (bank_l, bank_ab, bank_neg)  # read in backward together with `undo`
        ctx.save_for_backward(idx)
        ctx.inv_t, ctx.undo, ctx.dtype = inv_t, undo, l.dtype
        return out_l, out_ab

    @staticmethod
    def backward(ctx, grad_l, grad_ab):
        (idx,) = ctx.saved_tensors
        bank_l, bank_ab, bank_neg = ctx.banks
        undo = ctx.undo
        if undo.generation is not None and undo.generation != undo.owner._generation:
            raise RuntimeError(
                "NCEAverage: the memory banks were updated by another forward before this backward; "
                "call backward before the next forward of the same NCEAverage"
            )
        grad_l, grad_ab = grad_l.contiguous(), grad_ab.contiguous()
        backward = _iic_backward if HAS_C else _iic_backward_reference
        gl, gab = backward(grad_l, grad_ab, bank_l, bank_ab, bank_neg, idx, ctx.inv_t, ctx.dtype)
        if undo.rows is not None and undo.rows.numel() > 0:
            rows = undo.rows
            pos = torch.searchsorted(rows, idx).clamp_(max=rows.numel() - 1)
            hit = rows[pos] == idx
            reps = grad_l.shape[1] // idx.shape[1]
            mask = hit.repeat(1, reps)
            d_l, d_ab, d_neg = undo.deltas
            zero = torch.zeros((), dtype=grad_l.dtype, device=grad_l.device)
            cl, cab = backward(
                torch.where(mask, grad_l, zero),
                torch.where(mask, grad_ab, zero),
                d_l,
                d_ab,
                d_neg,
                torch.where(hit, pos, torch.zeros_like(pos)),
                ctx.inv_t,
                ctx.dtype,
            )
            gl, gab = gl + cl, gab + cab
        return gl, gab, None, None, None, None, None, None


def _iic_backward(grad_l, grad_ab, bank_l, bank_ab, bank_neg, idx, inv_t, dtype):
    return torch.ops.iic_ext._iic_scores_backward(grad_l, grad_ab, bank_l, bank_ab, bank_neg, idx, inv_t, dtype)


def _iic_backward_reference(grad_l, grad_ab, bank_l, bank_ab, bank_neg, idx, inv_t, dtype):
    with torch.enable_grad():
        l = torch.zeros(idx.shape[0], bank_l.shape[1], dtype=dtype, device=idx.device, requires_grad=True)
        ab = torch.zeros_like(l, requires_grad=True)
        out = nce_ops.reference.iic_scores(l, ab, bank_l, bank_ab, bank_neg, idx, inv_t)
        return torch.autograd.grad(out, (l, ab), (grad_l, grad_ab))


class NCEAverage(nn.Module):
    """Memory banks and NCE scores of IIC (``intra_neg=True``) or CMC (``intra_neg=False``).

    Args:
        feat_dim: D, the feature size (512 in IIC).
        n_data: N, the number of training samples (one bank row each).
        nce_k: K, negatives drawn per sample.
        nce_t: temperature T.
        nce_m: momentum of the bank update.
        use_softmax: True: logits ``scores / T`` (for :class:`NCESoftmaxLoss`); False: the NCE form
            ``exp(scores / T) / Z`` with Z fixed from the first batch as ``mean * N`` (for
            :class:`NCECriterion`), computed in float32.
        intra_neg: keep the intra-negative bank ``memory_neg`` (IIC); False is the original
            ``NCEAverage_ori`` (CMC), whose forward takes no ``neg``.
        generator: ``torch.Generator`` the negatives are drawn from (default: a CPU generator seeded
            from torch's global RNG). Exposed as ``self.generator``: seed it, or save and restore
            ``generator.get_state()`` to resume exactly.

    Buffers (as the original): ``params`` = ``[K, T, Z_l, Z_ab, momentum]`` (Z = -1 until set),
    ``memory_l``, ``memory_ab`` (and ``memory_neg``), each [N, D], initialised uniform in
    ``[-1/sqrt(D/3), 1/sqrt(D/3))`` from the global generator, as the original; allocated with
    :func:`iic_ext.ops.empty_bank` (huge pages for large CPU banks).
    """

    def __init__(
        self,
        feat_dim: int,
        n_data: int,
        nce_k: int = 1024,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        use_softmax: bool = True,
        intra_neg: bool = True,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        self.n_data = n_data
        self.K = nce_k
        self.use_softmax = use_softmax
        self.intra_neg = intra_neg
        self.register_buffer("params", torch.tensor([nce_k, nce_t, -1, -1, nce_m]))
        stdv = 1.0 / math.sqrt(feat_dim / 3)

        def init():  # the original's torch.rand draws, in a bank allocated for random row reads
            return torch.rand(n_data, feat_dim, out=nce_ops.empty_bank(n_data, feat_dim)).mul_(2 * stdv).add_(-stdv)

        self.register_buffer("memory_l", init())
        self.register_buffer("memory_ab", init())
        if intra_neg:
            self.register_buffer("memory_neg", init())
        else:
            self.memory_neg = None
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        self.generator = generator
        self._generation = 0  # count of bank updates: a backward checks no update came after its forward
        self._host_params = (None, None)  # (key of the params buffer's state, its values as floats)

    def hyperparams(self):
        """``params`` as Python floats ``[K, T, Z_l, Z_ab, momentum]``, read from the device only when
        the buffer has changed (moved, loaded, Z set), so a step on a GPU does not wait for it."""
        p = self.params
        key = (id(p), p.data_ptr(), p.device, p._version)
        if self._host_params[0] != key:
            self._host_params = (key, p.tolist())
        return list(self._host_params[1])

    def seed(self, seed: int) -> None:
        """Seed the generator the negatives are drawn from."""
        self.generator.manual_seed(seed)

    def sample_idx(self, y: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
        """idx [B, K+1] (int64, y's device): uniform over the N rows, column 0 = y.

        The original draws from an alias sampler over uniform weights, i.e. plain uniform sampling.
        """
        k = self.K if k is None else k
        idx = torch.randint(
            0, self.memory_l.shape[0], (y.shape[0], k + 1), generator=self.generator, device=self.generator.device
        )
        idx = idx.to(y.device)
        idx.select(1, 0).copy_(y)
        return idx

    def forward(self, l: torch.Tensor, ab: torch.Tensor, *args, idx: Optional[torch.Tensor] = None):
        """``forward(l, ab, neg, y, idx=None)`` (intra_neg) or ``forward(l, ab, y, idx=None)``.

        Args:
            l, ab (Tensor[B, D]): features of the two views (any float dtype; AMP is fine).
            neg (Tensor[B, D]): feature of the intra-negative; it only updates ``memory_neg`` and
                receives no gradient.
            y (Tensor[B], int64): dataset indices of the samples.
            idx (Tensor[B, K+1], int64, optional): sampled rows; drawn from ``self.generator`` if None.

        Returns:
            (out_l, out_ab): Tensor[B, 2(K+1), 1] each ([B, K+1, 1] without intra_neg), the original's
            layout: logits in l's dtype (softmax) or float32 probabilities (NCE). The banks are then
            updated (rows y, momentum update), as the original does inside its forward.
        """
        neg, y, idx = self._parse(args, idx)
        K, T, _, _, momentum = self.hyperparams()
        K = int(K)
        if idx is None:
            idx = self.sample_idx(y, K)
        inv_t = 1.0 / T
        banks = (self.memory_l, self.memory_ab, self.memory_neg)
        track = torch.is_grad_enabled() and (l.requires_grad or ab.requires_grad)
        undo = _Undo(self) if track else None
        if track:
            out_l, out_ab = _ContrastScores.apply(l, ab, *banks, idx, inv_t, undo)
        else:
            out_l, out_ab = nce_ops.iic_scores(l, ab, *banks, idx, inv_t)

        out_l, out_ab = self._outputs(out_l, out_ab)
        with torch.no_grad():
            self.update(y, l, ab, neg, momentum, undo)
        return out_l.unsqueeze(-1), out_ab.unsqueeze(-1)

    def scores(self, l: torch.Tensor, ab: torch.Tensor, idx: torch.Tensor):
        """What :meth:`forward` returns, without updating the banks (update them with :meth:`update`
        after the backward). The backward reads the banks, so it must come before that update.

        Args:
            l, ab (Tensor[B, D]); idx (Tensor[B, K+1], int64) from :meth:`sample_idx`.

        Returns:
            (out_l, out_ab): Tensor[B, 2(K+1)] each ([B, K+1] without intra_neg): logits, or float32
            NCE probabilities ``exp(s / T) / Z`` (Z set at the first call as forward does).
        """
        inv_t = 1.0 / self.hyperparams()[1]
        out_l, out_ab = nce_ops.iic_scores(l, ab, self.memory_l, self.memory_ab, self.memory_neg, idx, inv_t)
        return self._outputs(out_l, out_ab)

    def _outputs(self, out_l, out_ab):
        """Logits unchanged (softmax mode), or the NCE form ``exp(s / T) / Z`` with Z fixed from the first
        batch as ``mean * N`` (the original)."""
        if self.use_softmax:
            return out_l, out_ab
        _, _, Z_l, Z_ab, _ = self.hyperparams()
        out_l, out_ab = torch.exp(out_l.float()), torch.exp(out_ab.float())
        n_rows = self.memory_l.shape[0]
        if Z_l < 0:
            self.params[2] = out_l.mean() * n_rows
            Z_l = self.params[2].item()
            log.info("normalization constant Z_l is set to %.1f", Z_l)
        if Z_ab < 0:
            self.params[3] = out_ab.mean() * n_rows
            Z_ab = self.params[3].item()
            log.info("normalization constant Z_ab is set to %.1f", Z_ab)
        return out_l / Z_l, out_ab / Z_ab

    def softmax_losses(self, l: torch.Tensor, ab: torch.Tensor, *args, idx: Optional[torch.Tensor] = None):
        """Both views' softmax losses in one fused pass, then the bank update (as :meth:`forward`).

        Same arguments as :meth:`forward`. The result equals :class:`NCESoftmaxLoss` applied to each
        of forward's outputs, per sample, without the ``[B, 2(K+1)]`` logits ever being stored
        (:func:`iic_ext.ops.iic_softmax_loss`); the gradient is computed in the same pass, so the
        backward does not read the banks and may come after later updates.

        Returns:
            (loss_l, loss_ab): Tensor[B] each, float32 (float64 with float64 features or banks);
            their means are the two terms of the IIC loss, ``exp(-loss)`` the positive's probability.
        """
        if not self.use_softmax:
            raise ValueError("softmax_losses needs use_softmax=True; the NCE form uses forward + NCECriterion")
        if not HAS_C:
            # no compiled library: the logits (whose backward undoes the update) and cross-entropy
            out_l, out_ab = self.forward(l, ab, *args, idx=idx)
            dt = torch.promote_types(torch.promote_types(l.dtype, self.memory_l.dtype), torch.float32)
            zero = torch.zeros(l.shape[0], dtype=torch.long, device=l.device)
            return (F.cross_entropy(out_l.squeeze(-1).to(dt), zero, reduction="none"),
                    F.cross_entropy(out_ab.squeeze(-1).to(dt), zero, reduction="none"))
        neg, y, idx = self._parse(args, idx)
        K, T, _, _, momentum = self.hyperparams()
        if idx is None:
            idx = self.sample_idx(y, int(K))
        loss_l, loss_ab = nce_ops.iic_softmax_loss(l, ab, self.memory_l, self.memory_ab, self.memory_neg, idx, 1.0 / T)
        with torch.no_grad():
            self.update(y, l, ab, neg, momentum)
        return loss_l, loss_ab

    def _parse(self, args, idx):
        n = 2 if self.intra_neg else 1
        if len(args) == n + 1 and idx is None:
            args, idx = args[:n], args[n]
        if len(args) != n:
            sig = "(l, ab, neg, y, idx=None)" if self.intra_neg else "(l, ab, y, idx=None)"
            raise TypeError(f"NCEAverage.forward takes {sig}, got {2 + len(args)} positional arguments")
        neg, y = (args[0], args[1]) if self.intra_neg else (None, args[0])
        return neg, y, idx

    @torch.no_grad()
    def update(self, y, l, ab, neg=None, momentum=None, undo=None):
        """``bank[y] = normalize(m bank[y] + (1 - m) feat)`` for the three banks (done by forward)."""
        momentum = self.hyperparams()[4] if momentum is None else momentum
        pairs = [(self.memory_l, l), (self.memory_ab, ab)]
        if self.intra_neg:
            if neg is None:
                raise TypeError("NCEAverage with intra_neg updates memory_neg: pass neg")
            pairs.append((self.memory_neg, neg))
        rows = old = None
        if undo is not None:
            rows = torch.unique(y)
            old = [bank.index_select(0, rows) for bank, _ in pairs]
        for bank, feat in pairs:
            nce_ops.bank_update_(bank, y, feat.detach(), momentum)
        self._generation += 1
        if undo is not None:
            deltas = []
            for (bank, _), o in zip(pairs, old):
                dt = torch.promote_types(bank.dtype, torch.float32)
                deltas.append(o.to(dt) - bank.index_select(0, rows).to(dt))
            if not self.intra_neg:
                deltas.append(None)
            undo.record(rows, tuple(deltas), self._generation)

    def extra_repr(self) -> str:
        n, d = self.memory_l.shape
        return f"feat_dim={d}, n_data={n}, nce_k={self.K}, use_softmax={self.use_softmax}, intra_neg={self.intra_neg}"


def _squeeze_scores(x: torch.Tensor) -> torch.Tensor:
    """[B, C, 1] -> [B, C]. (The original's ``x.squeeze()`` also drops B when B = 1.)"""
    return x.squeeze(-1) if x.dim() == 3 else x


class NCESoftmaxLoss(nn.Module):
    """Cross-entropy with the positive at column 0 (InfoNCE), on logits [B, C] or [B, C, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _squeeze_scores(x)
        label = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return F.cross_entropy(x, label)


class NCECriterion(nn.Module):
    """NCE loss (CMC Eq. 12) with noise distribution Pn = 1 / n_data and eps 1e-7, as the original.

    Input: probabilities [B, C] or [B, C, 1] from :class:`NCEAverage` with ``use_softmax=False``,
    positive at column 0. Returns a Tensor[1], as the original.
    """

    def __init__(self, n_data: int):
        super().__init__()
        self.n_data = n_data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz = x.shape[0]
        m = x.size(1) - 1
        noise = m / float(self.n_data)  # m * Pn
        p_pos = x.select(1, 0)
        log_d1 = torch.log(p_pos / (p_pos + (noise + _EPS)))
        p_neg = x.narrow(1, 1, m)
        log_d0 = torch.log(noise / (p_neg + (noise + _EPS)))
        return -(log_d1.sum(0) + log_d0.reshape(-1, 1).sum(0)) / bsz


@torch.no_grad()
def positive_prob(out: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the positive (column 0) per sample, from logits [B, C] or [B, C, 1].

    Returns:
        Tensor[B], float32.
    """
    return torch.softmax(_squeeze_scores(out).float(), dim=1)[:, 0]
