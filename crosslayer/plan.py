"""Sharing plans measured on data: what a plan costs, and a search for the plan that costs least
within a KV budget.

A plan is a `kv_sources` list (config.py). Layers of a pretrained model differ a lot in what sharing
costs them (docs/uptraining-smollm2.md), so a plan is worth measuring rather than fixing in advance.

Everything here runs on a `Reference`: the original (dense) model's activations on calibration
tokens (calibration.Calibration), computed once, and its next-token probabilities. The cost of a plan
is the mean KL divergence (nats per token) of the converted model's next-token distributions from the
original's on those tokens. A plan that equals another before layer `start` is measured from that
plan's hidden state at `start`, so only the layers from there on run.

`search` (contiguous groups of any size): greedy merging of adjacent groups, each merge measured on the
whole plan, down to a number of producers or while the next merge stays within a bound on the cost, then
boundary moves kept while they lower the cost (see `search`). Each producer's K/V map is fitted by weighted
least squares on the original model's activations (`Calibration.fit`), the `fit` initialisation of
convert.share_kv. `Searcher` packs a search for `convert.convert(search=...)` (producers, a KV budget, or a
bound on the KL): it scores plans on the first SEARCH_TOKENS calibration tokens (`search_reference`; the fit
of the final model uses all). crosslayer.frontier runs one search through every budget.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .calibration import Calibration, Run, progress_bar
from .config import describe, from_groups, kv_groups
from .convert import share_kv, sharing_config
from .errors import CrossLayerError
from .modeling import CLAForCausalLM

log = logging.getLogger(__name__)

SEARCH_TOKENS = 1024  # calibration tokens a search scores plans on (the first sequences of the calibration)
HEAD_ROWS = 256  # tokens per slice through the output layer (a (256, vocab) fp32 block at a time)


# ----------------------------------------------------------------------------------------------
# Plans


def producers_for_budget(kv_budget: float, num_layers: int) -> int:
    """The most producers whose KV bytes stay within `kv_budget` x the dense model's (at least one)."""
    if not 0 < kv_budget <= 1:
        raise CrossLayerError(f"kv_budget must be in (0, 1], a fraction of the original KV bytes; got {kv_budget}")
    return max(1, math.floor(kv_budget * num_layers + 1e-9))


# ----------------------------------------------------------------------------------------------
# The cost of a plan: KL divergence from the original model on calibration tokens


class Reference(Calibration):
    """Calibration activations (calibration.Calibration) plus the original model's output on them, so a plan
    run from any layer is scored by its KL divergence to the original.

    Kept per token, in fp32: the original normed final state h0, its logits z0 = W h0 (+ bias), and p @ W
    of its next-token probabilities p. A plan's logits are then z0 + W (h - h0): only the (small)
    difference goes through the output layer in the compute dtype, so a bf16 one rounds the difference,
    not logits of magnitude 10-30 (bf16 rounds those by up to 0.06), and the dense plan costs exactly 0.
    Every sum over the vocabulary is taken in fp32, HEAD_ROWS tokens at a time."""

    def __init__(self, dense: CLAForCausalLM, tokens: torch.Tensor, batch_size: int = 4, progress: bool = False,
                 compute_dtype: torch.dtype | None = None, compute_model: CLAForCausalLM | None = None,
                 **streaming: Any) -> None:
        """`streaming`: Calibration's `load`, `device`, `offload`; the output layer and final norm, which every
        plan's cost needs, are then loaded once and kept."""
        super().__init__(dense, tokens, batch_size, progress, compute_dtype, compute_model, **streaming)
        if self.load is not None:
            self.load("model.norm", self.model.model.norm)
            self.load("lm_head", self.model.lm_head)
        head = self.model.lm_head
        weight = head.weight.detach().float()  # (V, d)
        self.states: list[torch.Tensor] = []  # per chunk (b*T, d) fp32: the original normed final states h0
        self.logits: list[torch.Tensor] = []  # per chunk (b*T, V) fp32: z0
        self.targets: list[torch.Tensor] = []  # per chunk (b*T, d) fp32: p @ W
        self.mass: list[torch.Tensor] = []  # per chunk (b*T,) fp32: sum p (1 up to rounding)
        self.constant = 0.0  # sum over tokens of sum p log p - sum p z0
        with torch.no_grad():
            for x in self.hidden[-1]:
                h = self.model.model.norm(x.flatten(0, 1)).float()  # (b*T, d)
                z = F.linear(h, weight, None if head.bias is None else head.bias.float())  # (b*T, V)
                targets, mass = [], []
                for i in range(0, z.shape[0], HEAD_ROWS):
                    p = F.softmax(z[i : i + HEAD_ROWS], dim=-1)  # (rows, V)
                    self.constant += (torch.special.xlogy(p, p) - p * z[i : i + HEAD_ROWS]).sum().item()
                    targets.append(p @ weight)  # (rows, d)
                    mass.append(p.sum(-1))
                self.states.append(h)
                self.logits.append(z)
                self.targets.append(torch.cat(targets))
                self.mass.append(torch.cat(mass))

    def _head(self, final: list[torch.Tensor]):
        """Per HEAD_ROWS tokens of a run's final hidden states (per chunk (b, T, d)): (chunk index, rows, h - h0
        (rows, d) fp32, logits (rows, V) fp32)."""
        weight = self.model.lm_head.weight
        for c, x in enumerate(final):
            flat = x.flatten(0, 1)  # (b*T, d)
            for i in range(0, flat.shape[0], HEAD_ROWS):
                rows = slice(i, i + HEAD_ROWS)
                diff = self.model.model.norm(flat[rows]).float() - self.states[c][rows]  # (rows, d)
                yield c, rows, diff, self.logits[c][rows] + F.linear(diff.to(weight.dtype), weight).float()

    def kl(self, final: list[torch.Tensor]) -> float:
        """Mean KL(original || model) in nats per token, of the model whose last layer gave `final`.

        With p the original probabilities and z = z0 + W (h - h0) the model's logits, KL = sum p log p -
        sum p z + (sum p) logsumexp(z), and sum p z = sum p z0 + (h - h0) . (p @ W): one logsumexp over
        the vocabulary per token besides the output layer."""
        total = self.constant
        with torch.no_grad():
            for c, rows, diff, z in self._head(final):
                total += (self.mass[c][rows] * torch.logsumexp(z, -1) - (diff * self.targets[c][rows]).sum(-1)).sum().item()
        return total / self.num_tokens

    def loss(self, final: list[torch.Tensor]) -> float:
        """Mean next-token cross-entropy (nats) of the model whose last layer gave `final`, within each sequence
        (every position but the last of a sequence)."""
        total, count = 0.0, 0
        following = [torch.cat([c[:, 1:], torch.full_like(c[:, :1], -1)], 1).flatten() for c in self.chunks]  # -1: none
        with torch.no_grad():
            for c, rows, _, z in self._head(final):
                target = following[c][rows]
                keep = target >= 0
                z = z[keep]
                total += (torch.logsumexp(z, -1) - z.gather(1, target[keep, None])[:, 0]).sum().item()
                count += int(keep.sum())
        return total / count

    def run(self, kv_sources: list[int], start: int = 0, hidden: list[torch.Tensor] | None = None,
            keep_hidden: bool = False, kv_init: str = "fit") -> Run:
        """Run plan `kv_sources` (its K/V maps by `kv_init`, see convert.share_kv) on the calibration tokens
        from layer `start` on, given `hidden` there (`Calibration.run_layers`)."""
        model = share_kv(self.model, sharing_config(self.config, kv_sources), kv_init, self)
        return self.run_layers(model, start, hidden, keep_hidden)

    def cost(self, kv_sources: list[int], start: int = 0, hidden: list[torch.Tensor] | None = None,
             metric: str = "kl", keep_hidden: bool = False, kv_init: str = "fit") -> tuple[float, Run]:
        """(cost, run) of plan `kv_sources`, run from layer `start`: `kl` (to the original, nats per token)
        or `loss` (cross-entropy)."""
        run = self.run(kv_sources, start, hidden, keep_hidden, kv_init)
        return (self.kl(run.final) if metric == "kl" else self.loss(run.final)), run


# ----------------------------------------------------------------------------------------------
# Search


METRICS = ("kl", "loss")


def _starts(sizes: list[int]) -> list[int]:
    """First layer of each contiguous group."""
    return [sum(sizes[:g]) for g in range(len(sizes))]


class _Search:
    """The state of a search: the current plan (group sizes), its cost, and its hidden states at every
    layer (so a change from group g on is measured by running from g's first layer only)."""

    def __init__(self, reference: Reference, metric: str, progress: bool, sizes: list[int] | None = None) -> None:
        self.reference, self.metric, self.progress = reference, metric, progress
        self.t0 = time.perf_counter()
        self.evaluations = 0
        self.steps: list[dict[str, Any]] = []
        self.sizes = [1] * reference.config.num_hidden_layers
        self.base = 0.0 if metric == "kl" else reference.loss(reference.hidden[-1])  # the dense model's cost
        self.cost = 0.0
        self.hidden = dict(enumerate(reference.hidden))
        if sizes is not None and sizes != self.sizes:  # start from a given plan: its cost and hidden states
            cost, run = self.measure(sizes, 0)
            self.accept(sizes, cost, run, "start from the given plan")

    def measure(self, sizes: list[int], first: int) -> tuple[float, Run]:
        """Cost (above the dense model's) of the plan `sizes`, which equals the current plan before layer `first`."""
        self.evaluations += 1
        cost, run = self.reference.cost(from_groups(sizes), first, self.hidden[first], self.metric, keep_hidden=True)
        return cost - self.base, run

    def accept(self, sizes: list[int], cost: float, run: Run, what: str) -> None:
        before = describe(from_groups(self.sizes))
        self.sizes, self.cost = sizes, cost
        self.hidden.update(run.hidden)
        kv_sources = from_groups(sizes)
        # only the new plan's fitted groups stay: the candidates fitted so far would pile up (a Llama-2-7B-shape
        # group's map is 128 MB in fp32; its search held 15 GB of them), and a candidate measured again is refitted
        kept = {tuple(members) for members in kv_groups(kv_sources).values()}
        for group in [g for g in self.reference._fits if g not in kept]:
            del self.reference._fits[group]
        plan = describe(kv_sources)
        self.steps.append({"step": what, "from": before, "plan": plan, "kv_sources": kv_sources, "producers": len(sizes),
                           "cost": round(cost, 5), "evaluations": self.evaluations,
                           "seconds": round(time.perf_counter() - self.t0, 1)})
        log.info(f"[plan] {what}: {plan}: cost {cost:.4f} ({self.evaluations} runs, {time.perf_counter() - self.t0:.0f} s)")


def _merged(sizes: list[int], g: int) -> list[int]:
    """Groups g and g+1 merged into one (g's producer serves both)."""
    return sizes[:g] + [sizes[g] + sizes[g + 1]] + sizes[g + 2 :]


def _merge_greedily(state: _Search, producers: int, max_cost: float | None = None) -> dict[str, Any] | None:
    """Lazy greedy merging down to `producers` groups, or until the next merge would raise the cost above
    `max_cost` (step 1 of `search`). Returns that refused merge ({step, cost}), or None."""
    if len(state.sizes) <= producers:
        return None  # nothing to merge: not even the candidates are measured
    bar = progress_bar(None, state.progress, "plan search", total=len(state.sizes) - producers)
    # a candidate is a boundary: the first layer of a group that would join the group before it.
    # heap entries: (cost rise when last measured, boundary layer, at step)
    heap = []
    starts = _starts(state.sizes)
    for g, boundary in enumerate(starts[1:]):
        cost, _ = state.measure(_merged(state.sizes, g), starts[g])
        heapq.heappush(heap, (cost - state.cost, boundary, -1))  # stale from the start: measured again when on top
    step, runs = 0, {}  # runs: boundary -> its run, measured on the current plan
    while len(state.sizes) > producers:
        rise, boundary, measured_at = heapq.heappop(heap)
        starts = _starts(state.sizes)
        if boundary not in starts[1:]:
            continue  # merged away already
        g = starts.index(boundary) - 1
        candidate = _merged(state.sizes, g)
        if measured_at == step and boundary in runs:  # measured on the current plan and still the best
            what = f"merge layer {boundary} into group {starts[g]}"
            if max_cost is not None and state.cost + rise > max_cost:
                if bar:
                    bar.close()
                log.info(f"[plan] stop: {what} would cost {state.cost + rise:.4f} > {max_cost:g}")
                return {"step": what, "cost": round(state.cost + rise, 5)}
            state.accept(candidate, state.cost + rise, runs[boundary], what)
            step, runs = step + 1, {}
            if bar:
                bar.update(1)
            continue
        cost, runs[boundary] = state.measure(candidate, starts[g])
        heapq.heappush(heap, (cost - state.cost, boundary, step))
    if bar:
        bar.close()
    return None


def _move_boundaries(state: _Search, rounds: int) -> None:
    """Boundary moves on the whole plan, each kept when it lowers the cost (step 2 of `search`)."""
    for round_ in range(rounds):
        improved = False
        g = 0
        while g < len(state.sizes) - 1:
            sizes, first = state.sizes, _starts(state.sizes)[g]
            moves = []
            if sizes[g + 1] > 1:
                moves.append((sizes[:g] + [sizes[g] + 1, sizes[g + 1] - 1] + sizes[g + 2 :], "back"))
            if sizes[g] > 1:
                moves.append((sizes[:g] + [sizes[g] - 1, sizes[g + 1] + 1] + sizes[g + 2 :], "forward"))
            for candidate, direction in moves:
                cost, run = state.measure(candidate, first)
                if cost < state.cost - 1e-6:
                    layer = first + sizes[g] if direction == "back" else first + sizes[g] - 1
                    state.accept(candidate, cost, run, f"move layer {layer} {direction} (round {round_ + 1})")
                    improved = True
                    break
            g += 1
        if not improved:
            break


def search(reference: Reference, producers: int, metric: str = "kl", refine_rounds: int = 1,
           progress: bool = False, start: list[int] | None = None, max_cost: float | None = None) -> dict[str, Any]:
    """The contiguous sharing plan of `producers` groups that costs least on the calibration data, as
    far as this search finds it (module docstring):

      1. greedy merging: from the dense model, repeatedly merge the two adjacent groups whose merge
         raises the cost of the whole plan least (the earlier group's producer serves both), until
         `producers` groups are left (or from the contiguous plan `start`, e.g. an earlier search's
         result for more producers, continuing its merges). Merge costs are kept from earlier steps and only the best one is
         measured again on the current plan, until the best stays best (lazy greedy). With `max_cost`, merging
         also stops before the merge it would make next when that would raise the plan's cost above `max_cost`
         (so the plan has between `producers` and all the layers' groups);
      2. boundary moves: the first layer of a group joins the group before it, or the last layer of a
         group joins the one after it, kept whenever the whole plan's cost falls; `refine_rounds`
         passes over every boundary at most.

    Every cost is measured on the whole model with fitted K/V maps (`Reference.cost`). Returns
    kv_sources, its producers and cost, every step taken (plan, kv_sources, cost, runs so far, seconds), and
    `refused`: the merge `max_cost` stopped (step, cost), or None. The merges do not depend on `producers`:
    a search for fewer producers takes the same merges first.
    """
    if metric not in METRICS:
        raise CrossLayerError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    n = reference.config.num_hidden_layers
    if not 1 <= producers <= n:
        raise CrossLayerError(f"producers must be between 1 and the model's {n} layers; got {producers}")
    if max_cost is not None and not max_cost >= 0:
        raise CrossLayerError(f"max_cost must be a number >= 0 (the most the plan may cost); got {max_cost}")
    sizes = None
    if start is not None:
        sizes = [len(m) for m in kv_groups(start).values()]
        if start != from_groups(sizes):
            raise CrossLayerError(f"search can start from a plan of contiguous groups only; got {describe(start)}")
        if len(sizes) < producers:
            raise CrossLayerError(f"the start plan has {len(sizes)} producers, fewer than the {producers} asked for")
    state = _Search(reference, metric, progress, sizes)
    refused = _merge_greedily(state, producers, max_cost)
    _move_boundaries(state, refine_rounds)
    kv_sources = from_groups(state.sizes)
    return {"kv_sources": kv_sources, "plan": describe(kv_sources), "producers": len(state.sizes), "metric": metric,
            "cost": state.cost, "evaluations": state.evaluations, "steps": state.steps, "refused": refused,
            "seconds": round(time.perf_counter() - state.t0, 1)}


def search_reference(calibration: Calibration, search_tokens: int = SEARCH_TOKENS, progress: bool = False) -> Reference:
    """The Reference a search scores plans on: the first `search_tokens` of `calibration`'s tokens (whole
    sequences, at least one), computed as the calibration was (its compute model, streamed weights, device,
    and a `search` folder inside its offload folder)."""
    tokens = calibration.tokens[: max(1, search_tokens // calibration.tokens.shape[1])]  # (rows, T)
    offload = None if calibration.offload is None else calibration.offload / "search"
    if offload is not None:
        offload.mkdir(exist_ok=True)
    return Reference(calibration.dense, tokens, progress=progress, compute_dtype=calibration.compute_dtype,
                     compute_model=calibration.model, load=calibration.load, device=calibration.device, offload=offload)


@dataclass
class Searcher:
    """A plan search for `convert.convert(search=...)`: `producers` groups, as many as `kv_budget` (a fraction
    of the dense model's KV bytes) allows, or as few as the merges reach while the plan's KL to the original
    stays within `max_kl` (nats per token: merging stops before a merge that would cost more; metric kl); plans
    scored on the first `search_tokens` of the calibration tokens (whole sequences, at least one)."""

    producers: int | None = None
    kv_budget: float | None = None
    metric: str = "kl"
    search_tokens: int = SEARCH_TOKENS
    progress: bool = False
    max_kl: float | None = None

    def check(self, num_layers: int) -> int:
        """The number of producers the search merges down to (with max_kl: at most, 1) for a model of
        `num_layers` layers; refuses settings that cannot work."""
        if sum(x is not None for x in (self.producers, self.kv_budget, self.max_kl)) != 1:
            raise CrossLayerError("plan search: give exactly one of producers (a number of K/V-producing layers), "
                                  "kv_budget (a fraction of the original KV bytes, e.g. 0.5) or max_kl (the most KL "
                                  "to the original model the plan may cost, nats per token)")
        if self.metric not in METRICS:
            raise CrossLayerError(f"metric must be one of {', '.join(METRICS)}; got {self.metric!r}")
        if self.max_kl is not None:
            if self.metric != "kl":
                raise CrossLayerError(f"max_kl bounds the KL to the original model: it needs metric kl, not "
                                      f"{self.metric!r}")
            if not self.max_kl >= 0:
                raise CrossLayerError(f"max_kl must be a number >= 0 (nats per token); got {self.max_kl}")
            return 1
        producers = self.producers if self.kv_budget is None else producers_for_budget(self.kv_budget, num_layers)
        if not 1 <= producers <= num_layers:
            raise CrossLayerError(f"producers must be between 1 and the model's {num_layers} layers; got {producers}")
        return producers

    def __call__(self, calibration: Calibration) -> dict[str, Any]:
        producers = self.check(calibration.config.num_hidden_layers)
        reference = search_reference(calibration, self.search_tokens, self.progress)
        result = search(reference, producers, self.metric, progress=self.progress, max_cost=self.max_kl)
        return {**result, "search_tokens": reference.num_tokens, "max_kl": self.max_kl}
