"""Router kinds: how an MoE layer scores its experts and picks the top k.

Every router maps token vectors x (N, H) to (weights (N, k), ids (N, k), logits (N, E)).
`logits` are the raw gate outputs (what transformers returns as router_logits); the
weights multiply the experts' outputs (or, for routers with `scales_input`, their
inputs). The offloaded runtime also uses a router on an *earlier* layer's input to
predict its choice (gate look-ahead); `lookahead_logits` gives the scores whose softmax
ranks experts the way this router would.

Kinds:
- `Router`         softmax over all experts, top k, optional renormalisation; an optional
                   gate bias (gpt-oss: top-k of the logits then softmax over the k, which
                   is the same as softmax, top-k, renormalise).
- `GroupedRouter`  DeepSeek-style: softmax or sigmoid scores, an optional correction bias
                   used only to choose, group-limited selection (n_group, topk_group),
                   renormalisation and a routed scaling factor (DeepSeek-V2/V3, GLM-4.5,
                   dots1, ERNIE-4.5 and the other V3-router families).
- `InputScaledRouter`  Llama 4: top k of the logits, sigmoid weights that scale the
                   experts' inputs.
- `SparseMixerRouter`  Phi-3.5-MoE: top two logits one after the other, each weighted
                   by a softmax over the logits near it (SparseMixer, inference form).
"""

from __future__ import annotations


import torch
from torch import nn

from ..cpu import linear
from ..fastops import route_softmax


class Router(nn.Module):
    """Linear gate, softmax over all experts, then top-k. With `norm_topk` the k weights
    are renormalised to sum to one (Mixtral always does this: it equals top-k then
    softmax).

    `adaptive` (None = off) is adaptive top-k gating from the Edge-MoE survey: a token
    keeps its ranked experts only until they cover this much routing probability (at least
    one, at most k), so confident tokens load fewer experts. Dropped slots get id -1 and
    weight 0; the kept weights are rescaled to the total the full top-k would have had.
    """

    kind = "softmax"
    supports_adaptive = True
    # Parameters kept in fp32 whatever the compute dtype (transformers'
    # _keep_in_fp32_modules_strict for the routers that compute in fp32).
    fp32_params: frozenset[str] = frozenset()
    scales_input = False  # weights multiply expert outputs (True: their inputs, Llama 4)

    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_topk: bool, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.bias = nn.Parameter(torch.empty(num_experts)) if bias else None
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk = norm_topk
        self.adaptive: float | None = None
        # Slots from this index on are padding (a layer pruned to fewer experts than the
        # model's count, config key edgemoe_experts_per_layer): their logits are -inf, so
        # every kind of router gives them zero probability and never picks them.
        self.routable: int | None = None

    def limit(self, n: int) -> None:
        """Let tokens be routed to slots 0..n-1 only."""
        if getattr(self, "n_group", 1) > 1:
            from ..errors import ModelLoadError

            raise ModelLoadError(f"edgemoe_experts_per_layer: a router that picks experts in {self.n_group} groups "
                                 "cannot have padding slots (not supported)")
        self.routable = None if n >= self.num_experts else n

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (N, E) with the padding slots at -inf (unchanged without padding)."""
        if self.routable is None:
            return logits
        return torch.cat([logits[..., : self.routable],
                          logits.new_full((*logits.shape[:-1], self.num_experts - self.routable), float("-inf"))],
                         dim=-1)  # (N, E)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask(linear(x, self.weight, self.bias))  # (N, E)

    def lookahead_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float logits whose softmax ranks experts as this router would, for x (N, H)
        taken from any layer (gate look-ahead)."""
        w = self.weight
        return self.logits(x if x.dtype == w.dtype else x.to(w.dtype)).float()  # (N, E)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if (type(self) is Router and self.bias is None and self.routable is None and self.adaptive is None
                and getattr(self.logits, "__func__", None) is Router.logits):  # (not replaced on the instance)
            # Decode steps (up to fastops' row limit): one C call instead of seven torch ops,
            # the same for a row whatever the rows in the step (ties go to the lower id).
            out = route_softmax(x, self.weight, self.top_k, self.norm_topk)
            if out is not None:
                return out
        logits = self.logits(x)  # (N, E)
        probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # (N, k) x2, descending
        if self.adaptive is not None:
            weights, ids = adaptive_keep(weights, ids, self.adaptive, self.norm_topk)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids, logits


def adaptive_keep(weights: torch.Tensor, ids: torch.Tensor, mass: float,
                  norm_topk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive gating on top-k probabilities `weights` (N, k), sorted descending: keep
    each row's slots while the probability ranked above them is below `mass` (so at least
    one); dropped slots get id -1 and weight 0. Without renormalisation to come, the kept
    weights are rescaled to the total the full top-k had."""
    total = weights.sum(dim=-1, keepdim=True)  # (N, 1)
    keep = (weights.cumsum(dim=-1) - weights) < mass  # mass ranked above each slot
    weights = weights * keep
    ids = ids.masked_fill(~keep, -1)
    if not norm_topk:
        weights = weights * (total / weights.sum(dim=-1, keepdim=True))
    return weights, ids


# Look-ahead score of experts a grouped router can never choose for a row (their group
# was not kept): far below any real score, finite so it survives float16 traces.
NEVER = -1e4


def _monotone(c: torch.Tensor, f, lo: float, hi: float = float("inf")) -> torch.Tensor:
    """f(c) on [lo, hi], continued beyond with slope 1: strictly increasing everywhere, so
    scores that leave f's domain (a correction bias pushes a sigmoid score past 1 or a
    probability below 0) keep their order instead of tying at a clamp."""
    inner = c.clamp(lo, hi)
    return f(inner) + (c - inner)


class GroupedRouter(Router):
    """DeepSeek-style routing.

    scores = softmax(logits) or sigmoid(logits); the choice uses scores + `correction`
    (a per-expert bias learned for load balance; it never enters the weights). With
    n_group > 1, experts form n_group equal groups; a group's score is its best expert
    ("max", DeepSeek-V2) or the sum of its best two ("top2", V3); only the best
    `topk_group` groups' experts may be chosen (the others' choice scores become `masked_score`, as
    in transformers). The weights are the chosen experts' scores, renormalised with
    `norm_topk` (denominator + `norm_eps`, or clamped at `norm_min`), times `scaling`.
    Adaptive gating applies to softmax scores (a distribution it can cover), not sigmoid ones.
    """

    kind = "grouped"
    supports_adaptive = False

    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_topk: bool, *, scoring: str = "sigmoid",
                 correction: bool = False, n_group: int = 1, topk_group: int = 1, group_score: str = "top2",
                 scaling: float = 1.0, norm_eps: float = 1e-20, norm_min: float | None = None,
                 bias: bool = False, masked_score: float = 0.0, float_logits: bool = False):
        super().__init__(hidden, num_experts, top_k, norm_topk, bias)
        # Gate matmul in fp32 whatever the model dtype (GLM-4.5, dots1, DeepSeek-V3 keep
        # their gate in fp32): in bf16 near-tied experts would otherwise swap.
        self.float_logits = float_logits
        # The correction bias only ranks experts: rounding it to bf16 could flip near-ties.
        self.fp32_params = frozenset({"weight", "bias", "e_score_correction_bias"} if float_logits
                                     else {"e_score_correction_bias"})
        # Choice score of experts outside the kept groups: 0.0 (DeepSeek-V2) or -inf (V3,
        # GLM-4.5, EXAONE-MoE: never chosen, even over a negative corrected score).
        self.masked_score = masked_score
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown router scoring {scoring!r}")
        if group_score not in ("max", "top2"):
            raise ValueError(f"unknown group score {group_score!r}")
        self.kind = f"grouped-{scoring}"
        # Softmax scores are a distribution over the experts that adaptive gating can cover;
        # sigmoid scores are independent per expert and sum to no total.
        self.supports_adaptive = scoring == "softmax"
        self.scoring, self.n_group, self.topk_group = scoring, n_group, topk_group
        self.group_score, self.scaling, self.norm_eps, self.norm_min = group_score, scaling, norm_eps, norm_min
        # Loaded from the checkpoint's e_score_correction_bias (named after it).
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts)) if correction else None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if not self.float_logits:
            return super().logits(x)
        b = None if self.bias is None else self.bias.float()
        return self.mask(linear(x.float(), self.weight.float(), b))  # (N, E) fp32

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        z = logits.float()
        return torch.sigmoid(z) if self.scoring == "sigmoid" else torch.softmax(z, dim=-1)  # (N, E)

    def corrected(self, scores: torch.Tensor) -> torch.Tensor:
        return scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()

    def group_mask(self, c: torch.Tensor) -> torch.Tensor | None:
        """(N, E) True for the experts of each row's `topk_group` best groups, judged on the
        corrected scores c (N, E); None without group-limited routing."""
        if self.n_group <= 1:
            return None
        N, E = c.shape
        grouped = c.view(N, self.n_group, E // self.n_group)  # (N, G, E/G)
        if self.group_score == "max":
            g = grouped.max(dim=-1).values  # (N, G)
        else:
            g = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
        top = g.topk(self.topk_group, dim=-1, sorted=False).indices  # (N, topk_group)
        mask = torch.zeros_like(g, dtype=torch.bool).scatter_(1, top, True)  # (N, G)
        return mask.unsqueeze(-1).expand_as(grouped).reshape(N, E)  # (N, E)

    def choice(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores the top-k is taken over: corrected, and `masked_score` outside the chosen groups."""
        c = self.mask(self.corrected(scores))  # padding slots: never chosen, whatever their bias
        mask = self.group_mask(c)
        return c if mask is None else c.masked_fill(~mask, self.masked_score)

    def lookahead_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ordered as this router's choice: the raw logits (sigmoid) or log-probabilities
        (softmax) without a correction bias, else a strictly increasing logit (or log) of
        the corrected score; experts of groups the router would not keep get NEVER."""
        z = super().lookahead_logits(x)  # (N, E)
        s = self.scores(z)
        c = self.corrected(s)
        if self.e_score_correction_bias is None:
            out = z if self.scoring == "sigmoid" else torch.log_softmax(z, dim=-1)
        elif self.scoring == "sigmoid":
            eps = 1e-6  # logit(c) is z itself where the bias is 0
            out = _monotone(c, torch.logit, eps, 1 - eps)
        else:
            out = _monotone(c, torch.log, 1e-30)
        mask = self.group_mask(c)
        return out if mask is None else out.masked_fill(~mask, NEVER)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.logits(x)  # (N, E)
        scores = self.scores(logits)  # (N, E)
        ids = torch.topk(self.choice(scores), self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, ids)  # (N, k)
        if self.adaptive is not None:  # softmax scores only (supports_adaptive)
            weights, order = weights.sort(dim=-1, descending=True)  # the bias may have chosen out of order
            weights, ids = adaptive_keep(weights, ids.gather(1, order), self.adaptive, self.norm_topk)
        if self.norm_topk:
            total = weights.sum(dim=-1, keepdim=True)
            total = total.clamp_min(self.norm_min) if self.norm_min is not None else total + self.norm_eps
            weights = weights / total
        if self.scaling != 1.0:
            weights = weights * self.scaling
        return weights.to(x.dtype), ids, logits


class InputScaledRouter(Router):
    """Llama 4: the top k of the raw logits, each weighted by the sigmoid of its own
    logit (no softmax, no renormalisation). The weights multiply the experts' *inputs*
    (`scales_input`); MoEBlock then sums the experts' outputs unweighted. The logits
    themselves rank the experts, so the look-ahead scores are the plain logits."""

    kind = "sigmoid-input"
    supports_adaptive = False  # sigmoid weights are not a distribution to cover
    scales_input = True

    def __init__(self, hidden: int, num_experts: int, top_k: int):
        super().__init__(hidden, num_experts, top_k, norm_topk=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.logits(x)  # (N, E)
        top, ids = torch.topk(logits, self.top_k, dim=-1)  # (N, k) x2
        weights = torch.sigmoid(top.float())  # (N, k)
        return weights.to(x.dtype), ids, logits


class SparseMixerRouter(Router):
    """Phi-3.5-MoE's SparseMixer routing as run at inference (transformers' eval mode;
    training samples the experts with Gumbel noise instead). Always two experts:

    1. the first is the top logit m1; its weight is the softmax, at that expert, over
       the logits z_j close to it: (m1 - z_j) / max(|z_j|, m1) <= 2 * jitter_eps (the
       others are masked out);
    2. the second is the top logit m2 of the other experts; its weight is the softmax,
       at it, over the other experts' logits close to m2 in the same sense.

    The two weights are used as they are (no renormalisation)."""

    kind = "sparsemixer"
    supports_adaptive = False

    def __init__(self, hidden: int, num_experts: int, jitter_eps: float):
        super().__init__(hidden, num_experts, 2, norm_topk=False)
        self.jitter_eps = jitter_eps

    def _pick(self, scores: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top expert of `pool` (scores with already chosen experts at -inf) and its
        weight: softmax at it over the pool's experts within the relative threshold."""
        top, ids = pool.max(dim=-1, keepdim=True)  # (N, 1) x2
        factor = scores.abs().clamp(min=top)  # (N, E)
        far = (top - scores) / factor > 2 * self.jitter_eps  # (N, E)
        weight = torch.softmax(pool.masked_fill(far, float("-inf")), dim=-1).gather(-1, ids)  # (N, 1)
        return weight, ids

    def lookahead_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The raw logits: the first expert is their maximum and the second the maximum
        of the rest, so their softmax ranks the two picks as this router does."""
        return super().lookahead_logits(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # In the logits' dtype, as transformers computes it.
        logits = self.logits(x)  # (N, E)
        w1, id1 = self._pick(logits, logits)  # (N, 1) x2
        w2, id2 = self._pick(logits, logits.scatter(-1, id1, float("-inf")))  # (N, 1) x2
        weights, ids = torch.cat([w1, w2], dim=-1), torch.cat([id1, id2], dim=-1)  # (N, 2) x2
        return weights.to(x.dtype), ids, logits


def check_groups(num_experts: int, n_group: int, topk_group: int, top_k: int, source: str,
                 group_score: str = "top2") -> None:
    """Group-limited routing needs equal groups and enough experts in the kept groups
    (and two per group when a group scores by its top two)."""
    from ..errors import ModelLoadError

    if n_group < 1 or num_experts % n_group:
        raise ModelLoadError(f"{source}: n_group {n_group} does not divide the {num_experts} routed experts")
    if not 1 <= topk_group <= n_group:
        raise ModelLoadError(f"{source}: topk_group {topk_group} must be between 1 and n_group {n_group}")
    if n_group > 1 and topk_group * (num_experts // n_group) < top_k:
        raise ModelLoadError(f"{source}: topk_group {topk_group} groups of {num_experts // n_group} experts "
                             f"hold fewer than the {top_k} experts each token picks")
    if n_group > 1 and num_experts // n_group < 2 and group_score == "top2":
        raise ModelLoadError(f"{source}: groups of one expert cannot be scored by their top two")


__all__ = ["Router", "GroupedRouter", "InputScaledRouter", "SparseMixerRouter", "adaptive_keep", "check_groups"]


# ----------------------------------------------------------------------------- cache-aware routing
#
# Training-free cache-aware routing, after Skliar et al., "Mixture of Cache-Conditional
# Experts for Efficient Mobile Device Inference" (arXiv 2412.00099): MoE quality barely
# moves when a chosen expert is swapped for one that scored almost as well, so when the
# runtime would have to read a chosen expert, an expert it already holds whose score is
# within MARGIN is used instead. This is the margin form of the paper's idea (it studies
# max-rank, cumulative-probability and cache-prior variants); MARGIN is a difference in
# the score the router ranks by:
#
# - softmax routers (`Router`): routing probability, softmax over all experts (0..1);
# - grouped routers (`GroupedRouter`): the choice score, i.e. the softmax probability or
#   sigmoid score plus the correction bias; experts of groups the router did not keep for
#   the token are never candidates.
#
# Rule, per token row: take the chosen experts that are not resident (adaptive gating's
# dropped slots are left alone), weakest first, and the resident experts that were not
# chosen, best first; pair them in that order and swap each pair whose score difference
# (chosen minus resident) is at most MARGIN. Since the first list ascends and the second
# descends, the differences grow along the pairs, so the swapped pairs are a prefix. The
# new set is then weighted exactly as the router weighs a set it chose (its scores at the
# new experts, renormalised, scaled, adaptive rescaling), so MARGIN 0 changes nothing but
# exact ties.


def prefer_resident(scores: torch.Tensor, ids: torch.Tensor, resident, margin: float,
                    allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The rule above. scores (N, E) float: what the router ranks by; ids (N, k) the chosen
    experts (-1: dropped); resident: set of expert ids the runtime holds; allowed (N, E)
    bool or None: experts the router may choose per row. Returns the new ids (N, k) and
    the number of swapped slots."""
    N, k = ids.shape
    if N == 1:  # decode: a few Python comparisons beat a dozen tiny tensor ops
        row = ids[0].tolist()
        sc = scores[0].tolist()
        weak = sorted((sc[e], i) for i, e in enumerate(row) if e >= 0 and e not in resident)
        if not weak:
            return ids, 0
        ok = allowed[0].tolist() if allowed is not None else None
        cands = sorted((e for e in resident if e not in row and (ok is None or ok[e])), key=lambda e: (-sc[e], e))
        out, n = list(row), 0
        for (s, i), c in zip(weak, cands):
            if s - sc[c] > margin:
                break
            out[i] = c
            n += 1
        return (torch.tensor([out], dtype=ids.dtype) if n else ids), n
    E = scores.shape[1]
    valid = ids >= 0
    safe = ids.clamp_min(0)
    held = torch.zeros(E, dtype=torch.bool)
    if resident:
        held[list(resident)] = True
    stays = held[safe] | ~valid  # (N, k) slots never swapped
    s = scores.gather(1, safe).masked_fill(stays, float("inf"))  # (N, k)
    s_sorted, order = s.sort(dim=1)  # non-resident chosen, weakest first
    chosen = torch.zeros(N, E + 1, dtype=torch.bool).scatter_(1, ids.masked_fill(~valid, E), True)[:, :E]
    cand = scores.masked_fill(chosen | ~held, float("-inf"))  # (N, E)
    if allowed is not None:
        cand = cand.masked_fill(~allowed, float("-inf"))
    c_val, c_idx = cand.topk(k, dim=1)  # resident candidates, best first
    swap = (s_sorted - c_val) <= margin  # +inf - x and x - (-inf) are +inf: never swapped
    n = int(swap.sum())
    if not n:
        return ids, 0
    new_sorted = torch.where(swap, c_idx, ids.gather(1, order))
    return ids.clone().scatter_(1, order, new_sorted), n


def cache_routing_unsupported(router: nn.Module) -> str | None:
    """Why cache-aware routing cannot run on this router (None: it can). Only the router
    kinds whose weighting `cache_route` reproduces qualify; a subclass that weighs its
    experts its own way (a new forward) is refused rather than weighted wrongly."""
    if isinstance(router, GroupedRouter) and type(router).forward is GroupedRouter.forward:
        return None
    if type(router) is not GroupedRouter and isinstance(router, Router) and type(router).forward is Router.forward:
        return None
    if isinstance(router, InputScaledRouter):
        return "it ranks raw logits and weighs each expert by their sigmoid: no routing probability to measure a margin in"
    if isinstance(router, SparseMixerRouter):
        return "it picks its two experts one after the other, each weighted against the logits near it"
    return "it weighs the chosen experts its own way"


def cache_route(router: Router, logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, resident,
                margin: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Cache-aware routing of one router call (see the notes above): the router's output
    (weights (N, k), ids (N, k), logits (N, E)) with non-resident experts swapped for
    resident ones within `margin`, and the number of swapped slots. Rows without a swap
    keep their weights bit for bit."""
    if ids.shape[0] == 1 and all(e < 0 or e in resident for e in ids[0].tolist()):
        return weights, ids, 0  # decode, every chosen expert in memory: the common case, kept cheap
    grouped = isinstance(router, GroupedRouter)
    if grouped:
        scores = router.scores(logits)  # (N, E)
        rank = router.corrected(scores)
        allowed = router.group_mask(rank)
    else:
        scores = rank = torch.softmax(logits.float(), dim=-1)  # (N, E), as forward computes it
        allowed = None
    new_ids, n = prefer_resident(rank, ids, resident, margin, allowed)
    if not n:
        return weights, ids, 0
    k = router.top_k
    w = scores.gather(1, new_ids.clamp_min(0))  # (N, k)
    if router.adaptive is not None:
        w = w.masked_fill(new_ids < 0, 0.0)
        if not router.norm_topk:  # adaptive rescaling: to the mass the full top-k had
            top = torch.topk(router.choice(scores), k, dim=-1).indices if grouped else None
            full = scores.gather(1, top) if grouped else torch.topk(scores, k, dim=-1).values
            w = w * (full.sum(dim=-1, keepdim=True) / w.sum(dim=-1, keepdim=True))
    if router.norm_topk:
        total = w.sum(dim=-1, keepdim=True)
        if grouped:
            total = total.clamp_min(router.norm_min) if router.norm_min is not None else total + router.norm_eps
        w = w / total
    if grouped and router.scaling != 1.0:
        w = w * router.scaling
    changed = (new_ids != ids).any(dim=-1, keepdim=True)  # (N, 1)
    return torch.where(changed, w.to(weights.dtype), weights), new_ids, n


__all__ += ["cache_route", "cache_routing_unsupported", "prefer_resident"]
