"""DeepSeekMoE: shared experts that see every token plus routed experts chosen per token by a gate
(V2's softmax gate, greedy or group-limited; V3's sigmoid gate with the aux-loss-free correction bias).
Routed experts are stacked in two tensors and run on the tokens routed to them, one matmul pair each."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ModelConfig
from .derived import DerivedWeights


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

        self._derived = DerivedWeights()  # gate_up [D, 2I], down [I, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D]."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            # Under torch.compile (the trainer's full-sequence forwards) too: dynamo would guard on the derived
            # copies' state and compile the block again when they are made.
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # Inference (rollouts): one matmul for gate and up, over weights derived once per weight version.
        return swiglu(x, *self.decode_weights())

    def forget_derived_weights(self) -> None:
        self._derived.mark_stale()

    def refresh_derived_weights(self) -> None:
        self._derived.refresh(self.decode_weights)

    def decode_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference copies, laid out [in, out] (MKL multiplies a few rows by a [K, N] matrix up to a quarter
        faster than by a transposed [N, K] one): gate_up [D, 2I] (gate's columns, then up's), down [I, D]."""
        g, u, d = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
        key = tuple(v for w in (g, u, d) for v in (w.data_ptr(), w._version))
        gate_up, down = self._derived.get(key, lambda: (torch.cat([g, u]).t().contiguous().detach(),
                                                         d.t().contiguous().detach()))
        return gate_up, down  # type: ignore[return-value]


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x [..., D], gate_up [D, 2I] (gate's columns, then up's), down [I, D] -> down(silu(gate x) * up x) [..., D]."""
    gate, up = (x @ gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down


@dataclass(frozen=True)
class Routing:
    """The gate's choice, a pure function of the router logits (V2's softmax gate, greedy or group-limited;
    V3's sigmoid gate, group-limited, with the aux-loss-free correction bias)."""

    n_experts: int
    top_k: int
    scoring_func: str
    topk_method: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    route_scale: float

    def __call__(self, logits: torch.Tensor, correction_bias: torch.Tensor | None,
                 forced_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits [N, E] (float32) -> weights [N, K], expert ids [N, K], scores [N, E]; see `Gate.forward`."""
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if correction_bias is None else scores + correction_bias
        if self.topk_method != "greedy" and self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # V3: sum of each group's top two
            else:
                group_scores = grouped.amax(dim=-1)  # V2: each group's best expert
            top_groups = group_scores.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
            fill = float("-inf") if self.topk_method == "noaux_tc" else 0.0
            choice = grouped.masked_fill(~keep.unsqueeze(-1), fill).view(-1, self.n_experts)
        expert_ids = choice.topk(self.top_k, dim=-1).indices
        if forced_ids is not None:
            expert_ids = torch.where(forced_ids[:, :1] >= 0, forced_ids.long(), expert_ids)
        weights = scores.gather(1, expert_ids)  # the bias picks experts; the unbiased scores weigh them
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, expert_ids, scores


class Gate(nn.Module):
    """Chooses K of E experts per token and their weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.n_routed_experts is not None
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.routing = Routing(self.n_experts, self.top_k, cfg.scoring_func, cfg.topk_method, cfg.n_group,
                               cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            # Aux-loss-free balancing: a per-expert offset that only affects which experts are chosen.
            # A buffer, not a parameter: it moves by the sign of the load error, never by gradients.
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor, forced_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> weights [N, K] (x.dtype), expert ids [N, K], scores [N, E] (float32).

        forced_ids [N, K]: routing replay; rows >= 0 use these experts instead of choosing (their weights
        still come from this gate's scores, so the gate keeps its gradient); rows of -1 choose as usual."""
        with torch.autocast(x.device.type, enabled=False):  # routing decisions stay in float32
            logits = F.linear(x.float(), self.weight.float())
        weights, expert_ids, scores = self.routing(logits, self.e_score_correction_bias, forced_ids)
        return weights.to(x.dtype), expert_ids, scores


def sort_by_expert(expert_ids: torch.Tensor, n_experts: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """expert_ids [N, K] -> the (token, expert) pairs in expert order: flat_ids [N*K] (pair i's expert),
    order [N*K] (the pairs sorted by expert, stable), token_of [N*K] (each sorted pair's token) and
    counts [E] (pairs per expert)."""
    flat_ids = expert_ids.flatten()
    order = flat_ids.argsort(stable=True)
    token_of = order // expert_ids.shape[1]
    counts = flat_ids.new_zeros(n_experts).scatter_add_(0, flat_ids, torch.ones_like(flat_ids))  # a bincount
    return flat_ids, order, token_of, counts


def padded_experts(x: torch.Tensor, weights: torch.Tensor, flat_ids: torch.Tensor, order: torch.Tensor,
                   token_of: torch.Tensor, counts: torch.Tensor, capacity: int, gate_up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    """Decode-sized batches, a few tokens per expert: every expert's tokens padded to `capacity` (the
    largest count) and all experts run as two batched matmuls, instead of two small matmuls per expert.
    x [N, D], weights [N, K], the rest from `sort_by_expert`; gate_up [E, D, 2I], down [E, I, D]
    (`Experts.decode_weights`) -> [N, D]."""
    E, D = gate_up.shape[0], x.shape[1]
    sorted_ids = flat_ids[order]
    rank = torch.arange(order.shape[0], device=x.device) - (counts.cumsum(0) - counts)[sorted_ids]
    xs = x.new_zeros(E, capacity, D)
    xs[sorted_ids, rank] = x[token_of]
    gate, up = torch.bmm(xs, gate_up).chunk(2, dim=-1)
    ys = torch.bmm(F.silu(gate) * up, down)[sorted_ids, rank]  # [N*K, D]
    ys = ys * weights.flatten()[order].unsqueeze(1)
    return torch.zeros_like(x).index_add_(0, token_of, ys)


@torch.library.custom_op("r1_grpo::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, transpose_w: bool) -> torch.Tensor:
    """Rows in expert order times their expert's matrix: x [M, K], w [E, K, N] (or [E, N, K], nn.Linear's
    layout, with transpose_w), ends [E] (int32, the cumulative row counts) -> [M, N].

    PyTorch's grouped matmul (private, as transformers uses it) as an op of ours, so that torch.compile
    traces the MoE layer around it (PyTorch's own shape rule accepts only bf16) and takes the weights as
    they are stored (a transposed view would be copied)."""
    return torch._grouped_mm(x.contiguous(), w.transpose(1, 2) if transpose_w else w, offs=ends)


@grouped_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, transpose_w: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[1] if transpose_w else w.shape[2])


@torch.library.custom_op("r1_grpo::grouped_outer", mutates_args=())
def grouped_outer(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Per expert a_e^T b_e, for the weights' gradient: a [M, P], b [M, Q], ends [E] -> [E, P, Q] (zeros
    for an expert with no rows)."""
    return torch._grouped_mm(a.contiguous().t(), b.contiguous(), offs=ends)


@grouped_outer.register_fake
def _(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return a.new_empty(ends.shape[0], a.shape[1], b.shape[1])


def _grouped_mm_setup(ctx, inputs, output) -> None:
    x, w, ends, ctx.transpose_w = inputs
    ctx.save_for_backward(x, w, ends)


def _grouped_mm_backward(ctx, grad: torch.Tensor):
    x, w, ends = ctx.saved_tensors
    dx = grouped_mm(grad, w, ends, not ctx.transpose_w) if ctx.needs_input_grad[0] else None
    dw = None
    if ctx.needs_input_grad[1]:
        dw = grouped_outer(grad, x, ends) if ctx.transpose_w else grouped_outer(x, grad, ends)
    return dx, dw, None, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


class _PermuteRows(torch.autograd.Function):
    """rows [M, D] -> rows[perm] [M, D], whose backward gathers by the inverse permutation: a gather, where
    indexing's own backward scatters-adds (in inductor's code, an atomic add per element)."""

    @staticmethod
    def forward(rows: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        return rows.index_select(0, perm)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class Experts(nn.Module):
    """The routed experts, stacked: gate_up_proj [E, 2I, D] (gate and up fused) and down_proj [E, D, I].

    Tokens are sorted by expert, so each expert that was hit runs one contiguous matmul pair on its
    tokens; experts that no token chose cost nothing."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.small_batch = 16  # up to this many tokens per expert on average, inference uses padded bmm
        self._derived = DerivedWeights()  # `decode_weights`
        self._packed = DerivedWeights()  # `packed_weights`

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [N, D], weights/expert_ids [N, K] -> sum_k weights[:, k] * expert_{ids[:, k]}(x)  [N, D]."""
        if x.is_cuda and not torch.is_grad_enabled():
            # `model.kernels`' dispatch (Triton on CUDA): expert offsets stay on the device, so a decode step
            # reads nothing back to the host and can be captured in a CUDA graph.
            return kernels.routed_experts(x, weights, expert_ids, self.gate_up_proj, self.down_proj)
        if x.is_cuda:
            # Training on CUDA, through the same dispatch: `kernels.routed_experts` differentiates itself (Triton's
            # grouped GEMMs and their backward, or torch._grouped_mm in bf16 on Hopper), with no host read of the
            # expert counts. Autocast does not reach its kernels: they run in autocast's dtype, cast here.
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
            with torch.autocast("cuda", enabled=False):
                return kernels.routed_experts(x.to(dtype), weights, expert_ids, self.gate_up_proj.to(dtype),
                                              self.down_proj.to(dtype))
        flat_ids, order, token_of, expert_counts = sort_by_expert(expert_ids, self.n_experts)
        if not torch.is_grad_enabled() and expert_ids.numel() <= self.small_batch * self.n_experts:
            counts = expert_counts.tolist()
            if self.pads_well(counts):
                return padded_experts(x, weights, flat_ids, order, token_of, expert_counts, max(counts),
                                      *self.decode_weights())
        N, K = expert_ids.shape
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(N * K, device=order.device))
        # [N*K, D] in expert order: each token's row K times, then permuted.
        xs = _PermuteRows.apply(x.unsqueeze(1).expand(N, K, x.shape[1]).reshape(N * K, -1), order, inverse)
        if self._grouped_mm_fits(x):
            # One grouped matmul per projection over every expert's rows: fewer, larger kernels than the loop
            # below (a tiny-model MoE layer's forward and backward over 1536 tokens: 29 ms against 34 ms).
            # No host read-back of the counts, so torch.compile traces the whole layer.
            ends = expert_counts.cumsum(0).to(torch.int32)
            gate, up = grouped_mm(xs, self.gate_up_proj, ends, True).chunk(2, dim=-1)
            ys = grouped_mm(F.silu(gate) * up, self.down_proj, ends, True)
        else:
            # split and unbind, not slicing and indexing: their backward writes each gradient once, instead
            # of scattering every expert's share into a fresh zero tensor of the full size.
            gate_up_w, down_w = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
            outs = []
            counts = expert_counts.tolist()
            for e, (rows, n) in enumerate(zip(xs.split(counts), counts)):
                if n == 0:
                    continue
                gate, up = F.linear(rows, gate_up_w[e]).chunk(2, dim=-1)
                outs.append(F.linear(F.silu(gate) * up, down_w[e]))
            ys = torch.cat(outs)
        ys = _PermuteRows.apply(ys, inverse, order).view(N, K, -1)  # back in (token, k) order
        return (ys * weights.unsqueeze(-1)).sum(dim=1)

    def _grouped_mm_fits(self, x: torch.Tensor) -> bool:
        """PyTorch's grouped matmul (private, as transformers uses it) serves float32 on a CPU, without
        autocast, with rows aligned to 16 bytes; anything else takes the per-expert loop."""
        return (hasattr(torch, "_grouped_mm") and x.device.type == "cpu" and x.dtype == torch.float32
                and self.gate_up_proj.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and x.shape[1] % 4 == 0 and self.down_proj.shape[2] % 4 == 0)

    def decode_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference copies for `padded_experts`, laid out [in, out] (a batched matmul of a few rows runs
        about a quarter faster on them): gate_up [E, D, 2I], down [E, I, D]. A second copy of the experts'
        weights while inference runs; re-derived when the weights change."""
        gu, d = self.gate_up_proj, self.down_proj
        key = (gu.data_ptr(), gu._version, d.data_ptr(), d._version)
        gate_up, down = self._derived.get(key, lambda: (gu.detach().transpose(1, 2).contiguous(),
                                                         d.detach().transpose(1, 2).contiguous()))
        return gate_up, down  # type: ignore[return-value]

    def packed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference copies in column panels for `model.native`'s routed experts, each panel contiguous:
        gate_up [E, ceil(I/8), D, 16] (8 gate columns, then the same 8 up columns), down [E, ceil(D/16), I, 16];
        zeros past I and D; float32 whatever the weights' dtype (the kernel's). Re-derived when the weights
        change."""
        gu, d = self.gate_up_proj, self.down_proj
        key = (gu.data_ptr(), gu._version, d.data_ptr(), d._version)

        def make():
            E, I, D = gu.shape[0], gu.shape[1] // 2, gu.shape[2]
            I8, D16 = -(-I // 8), -(-D // 16)
            with torch.no_grad():
                gate, up = (F.pad(w.float(), (0, 0, 0, I8 * 8 - I)).view(E, I8, 8, D).transpose(2, 3)
                            for w in gu.chunk(2, dim=1))
                gate_up = torch.cat([gate, up], dim=3).contiguous()  # [E, I8, D, 16]
                down = F.pad(d.float(), (0, 0, 0, D16 * 16 - D)).view(E, D16, 16, -1).transpose(2, 3).contiguous()
            return gate_up, down
        gate_up, down = self._packed.get(key, make)
        return gate_up, down  # type: ignore[return-value]

    def forget_derived_weights(self) -> None:
        self._derived.mark_stale()
        self._packed.mark_stale()

    def refresh_derived_weights(self) -> None:
        self._derived.refresh(self.decode_weights)
        self._packed.refresh(self.packed_weights)

    def pads_well(self, counts: list[int]) -> bool:
        """Whether `padded_experts` suits this load (pairs per expert): few tokens per expert, and padding
        every expert to the busiest one's count at most quadruples the rows. (At decode sizes two batched
        matmuls beat a loop of small ones even at that much padding: measured 5% faster eager, 10% compiled,
        on the tiny model's 32-sequence rollouts, where a bound of 2x sent a third of the steps to
        the loop.)"""
        pairs = sum(counts)
        return pairs <= self.small_batch * self.n_experts and max(counts) * self.n_experts <= 4 * pairs


class MoE(nn.Module):
    """Shared experts (every token) + routed experts (K per token, chosen by the gate)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.n_routed_experts is not None
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.n_experts, self.top_k = E, cfg.num_experts_per_tok
        self.gate = Gate(cfg)
        self.experts = Experts(E, D, I)
        self.shared_experts = MLP(D, I * cfg.n_shared_experts) if cfg.n_shared_experts else None
        # Tokens routed to each expert since the last bias update (aux-loss-free balancing).
        self.register_buffer("expert_load", torch.zeros(E), persistent=False)
        self.track_load = False
        self.seq_aux_alpha = 0.0
        self.aux_loss: torch.Tensor | None = None
        # Routing replay: when recording, the experts each token of the last forward went to, [B, T, K].
        self.record_routing = False
        self.last_expert_ids: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, routing: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. routing [B, T, K]: experts to use instead of the gate's choice
        (-1 rows: the gate chooses), e.g. those the rollout engine recorded for the same tokens."""
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        forced = routing.reshape(B * T, -1) if routing is not None else None
        weights, expert_ids, scores = self.gate(flat, forced)  # [N, K], [N, K], [N, E]
        self.note_routing(expert_ids.view(B, T, -1))
        out = self.experts(flat, weights, expert_ids).view(B, T, D)
        self.aux_loss = self._sequence_balance_loss(scores, expert_ids, B, T) if self.seq_aux_alpha > 0 else None
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def note_routing(self, expert_ids: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """What a forward records besides its output: the experts each token went to (routing replay) and
        their load (aux-loss-free balancing). expert_ids [B, T, K]; counts [E], the (token, expert) pairs per
        expert, worked out here when not given."""
        if self.record_routing:
            self.last_expert_ids = expert_ids
        if self.track_load:
            if counts is None:
                counts = torch.bincount(expert_ids.flatten(), minlength=self.n_experts)
            self.expert_load += counts.to(self.expert_load)

    def _sequence_balance_loss(self, scores: torch.Tensor, expert_ids: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """V3's complementary sequence-wise balance loss: alpha * sum_i f_i * P_i, averaged over sequences."""
        E, K = self.n_experts, self.top_k
        probs = scores / scores.sum(dim=-1, keepdim=True)  # normalized affinities s'_{i,t}
        P = probs.view(B, T, E).mean(dim=1)  # [B, E]
        hits = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, expert_ids.view(B, T * K), torch.ones(B, T * K, device=scores.device))
        f = hits * E / (K * T)  # [B, E]
        return self.seq_aux_alpha * (f * P).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self, speed: float) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts and lower the over-loaded ones
        by `speed`, by the sign of the load error; then start counting again."""
        bias = self.gate.e_score_correction_bias
        if bias is not None and self.expert_load.sum() > 0:
            bias += speed * torch.sign(self.expert_load.mean() - self.expert_load).to(bias)
        self.expert_load.zero_()
