"""The SpaMask network as pure torch/DGL modules: shared encoder, two decoders, two losses.

Nothing here knows about AnnData or randomness: masked nodes, dropped edges and negative pairs
are drawn by ``train.py`` and passed in. Every graph layer takes explicit node norms
(symmetric GCN normalisation from full-graph degrees: source rows scaled before aggregation,
destination rows after), so the same code runs on the full graph, on neighbour-sampled blocks
and in layer-wise inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dgl.nn import GraphConv
from torch import nn


class GCNLayer(nn.Module):
    """``dgl.nn.GraphConv`` with the normalisation passed in: nd * A (ns * h) W + b."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        self.conv = GraphConv(in_dim, out_dim, norm="none", bias=False, allow_zero_in_degree=True)
        self.bias = nn.Parameter(torch.zeros(out_dim)) if bias else None

    def forward(self, graph, h: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor]):
        """Aggregate ``h`` (source rows) over ``graph``; ``norm`` = (source, destination) scales."""
        ns, nd = norm
        # in place on the convolution's fresh output (neither its sparse nor its dense product
        # keeps it for the backward): the same products, one activation-sized tensor fewer
        out = self.conv(graph, h * ns.unsqueeze(1)).mul_(nd.unsqueeze(1))
        return out if self.bias is None else out.add_(self.bias)


class _PReLUFunction(torch.autograd.Function):
    """PReLU with one shared slope ``a``: forward by ``F.prelu``; a backward of plain
    element-wise ops. torch 2.2's own CPU backward (``_prelu_kernel_backward``) took 20-30 ms
    for an 11,380 x 512 activation, about ten of its element-wise passes, and four of them
    run every epoch. The gradients are the same, bit for bit: ``g`` where x > 0, ``a * g``
    elsewhere, and sum(x * g) over x <= 0 for the slope, reduced as torch reduces it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, a)
        return F.prelu(x, a)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a = ctx.saved_tensors
        grad_x = grad_a = None
        # besides the returned gradient, two activation-sized temporaries (clamp, sign); the
        # rest in place: on CPU a fresh tensor of that size costs more in page faults than
        # the arithmetic on it
        if ctx.needs_input_grad[1]:
            # the terms and the reduction torch's autograd uses for PReLU's broadcast slope
            # (x * g where x <= 0, else 0; summed over every dimension), so training is
            # bit-for-bit what it was with nn.PReLU
            grad_a = x.clamp(max=0).mul_(grad).sum(dim=tuple(range(x.dim())),
                                                   keepdim=True).reshape(a.shape)
        if ctx.needs_input_grad[0]:
            # +1 where x > 0, -1 where x <= 0 (x = 0 too, as in torch's PReLU); prelu(sign) *
            # sign is then exactly 1 or a, without torch.where (slow on CPU in torch 2.2)
            sign = torch.sign(x).sub_(0.5).sign_()
            grad_x = F.prelu(sign, a).mul_(sign).mul_(grad)
        return grad_x, grad_a


class PReLU(nn.Module):
    """``nn.PReLU()`` (one slope, 0.25 at start, parameter ``weight``) with a faster CPU
    backward; see :class:`_PReLUFunction`."""

    def __init__(self, init: float = 0.25):
        super().__init__()
        self.weight = nn.Parameter(torch.full((1,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _PReLUFunction.apply(x, self.weight)


class Encoder(nn.Module):
    """GraphConv -> BatchNorm -> PReLU, twice (input -> hidden -> latent)."""

    def __init__(self, in_dim: int, hidden_dim: int, latent_dim: int, batch_norm: bool = True):
        super().__init__()
        dims = [in_dim, hidden_dim, latent_dim]
        # a bias before batch-norm is cancelled by its centring: leave it out then
        self.convs = nn.ModuleList(GCNLayer(a, b, bias=not batch_norm)
                                   for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) if batch_norm else nn.Identity()
                                   for b in dims[1:])
        self.acts = nn.ModuleList(PReLU() for _ in dims[1:])

    @property
    def n_layers(self) -> int:
        """Number of graph layers (one graph or block each)."""
        return len(self.convs)

    def layer(self, i: int, graph, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Apply layer ``i`` alone (used by layer-wise inference)."""
        return self.acts[i](self.norms[i](self.convs[i](graph, h, weight)))

    def forward(self, graphs, h: torch.Tensor, weights) -> torch.Tensor:
        """Encode ``h`` with one graph (or block) and its (source, destination) norms per layer."""
        for i, (graph, weight) in enumerate(zip(graphs, weights)):
            h = self.layer(i, graph, h, weight)
        return h


class EdgeDecoder(nn.Module):
    """MLP on the element-wise product of two endpoint embeddings; returns logits."""

    def __init__(self, latent_dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(latent_dim, hidden_dim),
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, 1))

    def forward(self, h_src: torch.Tensor, h_dst: torch.Tensor) -> torch.Tensor:
        """Score pairs: one logit per row of ``h_src * h_dst``."""
        return self.mlp(h_src * h_dst).squeeze(-1)


class SpaMaskModule(nn.Module):
    """Shared encoder with a masked-feature (GAE) decoder and a masked-edge (GCL) decoder."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, latent_dim: int = 256, *,
                 batch_norm: bool = True, edge_decoder_hidden: int = 512,
                 edge_decoder_dropout: float = 0.5, mask_mode: str = "replace"):
        super().__init__()
        self.mask_mode = mask_mode
        self.encoder = Encoder(in_dim, hidden_dim, latent_dim, batch_norm)
        self.mask_token = nn.Parameter(torch.zeros(1, in_dim))
        self.e2d = nn.Linear(latent_dim, latent_dim, bias=False)
        nn.init.xavier_uniform_(self.e2d.weight)
        self.decoder = GCNLayer(latent_dim, in_dim)
        self.edge_decoder = EdgeDecoder(latent_dim, edge_decoder_hidden, edge_decoder_dropout)

    def forward(self, gae: dict, edge: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Both losses of one step from the keyword arguments of :meth:`gae_loss` and
        :meth:`edge_loss`: one call, so ``DistributedDataParallel`` sees every parameter."""
        return self.gae_loss(**gae), self.edge_loss(**edge)

    def mask_input(self, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Masked rows become the token ("replace") or features + token ("reference")."""
        keep = (~masked).unsqueeze(1).to(x.dtype)
        if self.mask_mode == "reference":
            return x + (1 - keep) * self.mask_token
        return x * keep + (1 - keep) * self.mask_token

    def gae_loss(self, enc_graphs, enc_weights, dec_graph, dec_weight, x_in: torch.Tensor,
                 masked_in: torch.Tensor, masked_mid: torch.Tensor, x_target: torch.Tensor,
                 masked_out: torch.Tensor, alpha: float) -> torch.Tensor:
        """Scaled cosine error on masked output nodes after mask -> encode -> re-mask -> decode.

        ``masked_in``/``masked_mid``/``masked_out`` flag masked nodes among the encoder input,
        decoder input and decoder output nodes (all the same set on the full graph).
        """
        h = self.encoder(enc_graphs, self.mask_input(x_in, masked_in), enc_weights)
        z = self.e2d(h) * (~masked_mid).unsqueeze(1).to(h.dtype)
        rec = self.decoder(dec_graph, z, dec_weight)
        return sce_loss(rec[masked_out], x_target[masked_out], alpha)

    def edge_loss(self, enc_graphs, enc_weights, x_in: torch.Tensor, pos: torch.Tensor,
                  neg: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of the dropped edges (``pos``) against non-edges (``neg``).

        ``pos`` and ``neg`` are (2, m) index tensors into the encoder's output nodes.
        """
        h = self.encoder(enc_graphs, x_in, enc_weights)
        # index_select, not h[idx]: a node appears in many pairs, and the backward of h[idx]
        # (index_put_ with accumulate) adds those rows with atomics on CPU threads, so its
        # sums change from run to run; index_select's backward adds them in a fixed order
        pos_logit = self.edge_decoder(h.index_select(0, pos[0]), h.index_select(0, pos[1]))
        neg_logit = self.edge_decoder(h.index_select(0, neg[0]), h.index_select(0, neg[1]))
        return _bce(pos_logit, 1.0) + _bce(neg_logit, 0.0)


def _bce(logit: torch.Tensor, target: float) -> torch.Tensor:
    """Mean binary cross-entropy of ``logit`` against a constant target; 0 (still attached to
    the graph, so every parameter gets a gradient) when a minibatch has no such pair, where
    the mean of nothing would be NaN."""
    if logit.numel() == 0:
        return logit.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logit, torch.full_like(logit, target))


def sce_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float) -> torch.Tensor:
    """Scaled cosine error: mean of (1 - cos(pred, target)) ** alpha over rows."""
    if pred.shape[0] == 0:
        return pred.sum() * 0.0
    cos = (F.normalize(pred, dim=-1) * F.normalize(target, dim=-1)).sum(-1)
    return (1 - cos).pow(alpha).mean()
