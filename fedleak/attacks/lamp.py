"""LAMP (Balunović et al., NeurIPS 2022), and the engine TAG and the pooler attack reuse.

Balunović, Dimitrov, Jovanović & Vechev, "LAMP: Extracting Text from Gradients with Language
Model Priors".
The attack optimises continuous word embeddings ``X̃ [B, T, H]`` so that the update they induce
on the sent model matches the client's, and alternates that with discrete steps that reorder
tokens:

* **continuous**: Adam on ``X̃`` (``[CLS]``, ``[SEP]`` and padding held at their embeddings) on
  ``L_grad + α_reg (mean_t ‖x̃_t‖ − s)²``; ``L_grad`` is LAMP_Cos's mean over parameter tensors
  of ``1 − cos(∇̃, ∇)`` (``distance = "cosine_layers"``) or any distance of
  :func:`fedleak.attacks._matching.distance` (``"l2_l1"`` is LAMP_L1+L2 and TAG).  StepLR
  decay every 50 steps, and the embeddings with the lowest objective seen are kept.
* **discrete** (every ``swap_every`` steps after ``swap_burnin``): per sentence, candidate
  transformations cycling through swap two tokens, move a token, move a span, move a prefix to
  the end, scored by ``L_grad + α_lm · NLL`` with the language prior of :mod:`fedleak.lm`
  (an n-gram model over word-pieces here; LAMP's GPT-2 prior needs a download), and the best
  one kept.
* **initialisation**: the best of ``init_candidates`` random embeddings, then of as many random
  permutations of it, by ``L_grad``; rescaled to the mean embedding norm ``s``.
* **decoding**: each position's nearest allowed token by cosine.

What the attack reads off the update before optimising (:mod:`fedleak.attacks._text`): the bag
of tokens (non-zero rows of the word-embedding update; it restricts decoding and the discrete
steps' ids, ``bag = false`` to ignore it, LAMP's default), the labels (classifier gradient,
:mod:`fedleak.attacks._labels`) and the longest sentence's length (position-embedding rows).
LAMP's own assumptions are options: ``known_labels`` and ``known_lengths`` give them to the
attack (``info`` says which were given); without known lengths and with several sentences,
each initial candidate also draws the sentences' lengths.  The predicted update goes through
:class:`fedleak.attacks._matching.Update` with a forward over embeddings, so a FedAvg update
(several local steps) is unrolled.

Threat model: honest-but-curious server, FedSGD (or FedAvg, unrolled), text classifier of the
BERT family.  The paper runs 2,000 steps with 500 initial and 200 swap candidates on a GPU; the
defaults here are CPU-sized (200 steps, 20 and 50), so numbers at the defaults are a "quick
tier" and should be compared with baselines run at the same budget.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedleak import lm
from fedleak.attacks import ATTACKS, _labels, _text
from fedleak.attacks._matching import DISTANCES, LAYER_WEIGHTS, Update, distance, layer_weights
from fedleak.core import Batch, Reconstruction, ServerView

TEXT_DISTANCES = ("cosine_layers", *DISTANCES)
INITS = ("random", "bag")
DECAY_EVERY = 50  # StepLR period of LAMP's scheduler


class _Embedded(nn.Module):
    """Runs a text model on *packed* inputs: word embeddings, then the attention mask.

    The mask travels as a last channel so that :class:`Update`'s per-step chunks of the batch
    carry their own masks.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, packed: Tensor) -> Tensor:
        return self.model.forward_embeds(packed[..., :-1], packed[..., -1])


@dataclass
class Problem:
    """One attack run: what is known, and the machinery to predict updates (for subclasses)."""

    view: ServerView
    update: Update
    model: nn.Module  # the Update's model copy (hooks registered on it see every prediction)
    labels: Tensor  # [B]
    lengths: Tensor  # [B] tokens per sentence, [CLS] and [SEP] included
    width: int  # T: longest sentence
    table: Tensor  # word-embedding matrix [V, H]
    allowed: Tensor  # ids a reconstruction may use
    special: _text.Specials
    prior: lm.Scorer
    weights: Tensor  # per-tensor weights of the distance
    lengths_known: bool
    size: float  # target mean norm of word embeddings (the regulariser's s)
    captured: list[Tensor] = field(default_factory=list)  # filled by subclasses' hooks
    state: dict[str, Any] = field(default_factory=dict)  # subclasses' own per-run state
    info: dict[str, float] = field(default_factory=dict)

    def assemble(self, free: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Embeddings ``[B, T, H]``: ``free`` at word positions, special embeddings elsewhere."""
        lengths = self.lengths if lengths is None else lengths
        position = torch.arange(self.width, device=lengths.device)[None, :]
        ids = torch.where(position == 0, self.special.cls, self.special.pad)
        ids = torch.where(position == lengths[:, None] - 1, self.special.sep, ids)
        words = (position > 0) & (position < lengths[:, None] - 1)
        return torch.where(words[..., None], free, self.table[ids])

    def pack(self, embeds: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``embeds`` with the attention mask appended as a last channel (see _Embedded)."""
        lengths = self.lengths if lengths is None else lengths
        mask = torch.arange(embeds.shape[1], device=embeds.device)[None, :] < lengths[:, None]
        return torch.cat([embeds, mask[..., None].to(embeds.dtype)], dim=-1)

    def words(self, lengths: Tensor | None = None) -> Tensor:
        """Mask ``[B, T]`` of the word positions (between [CLS] and [SEP])."""
        lengths = self.lengths if lengths is None else lengths
        position = torch.arange(self.width, device=lengths.device)[None, :]
        return (position > 0) & (position < lengths[:, None] - 1)

    def ids(self, free: Tensor) -> Tensor:
        """Token ids ``[B, T]`` of the nearest allowed tokens, specials at their places."""
        nearest = _text.nearest_tokens(free, self.table, self.allowed)
        position = torch.arange(self.width, device=nearest.device)[None, :]
        ids = torch.where(position == 0, self.special.cls, self.special.pad)
        ids = torch.where(position == self.lengths[:, None] - 1, self.special.sep, ids)
        return torch.where(self.words(), nearest, ids)


@ATTACKS.register("lamp")
@dataclass
class LAMP:
    """Embedding optimisation alternated with token reorderings scored by a language prior."""

    modality: ClassVar[str] = "text"
    steps: int = 200  # continuous Adam steps (paper: 2,000)
    lr: float = 0.01  # Adam step size
    lr_decay: float = 0.89  # StepLR factor every 50 steps (1 = constant)
    distance: str = "cosine_layers"  # LAMP_Cos; or "l2_l1" (LAMP_L1+L2, TAG), "l2", "cosine"
    l1: float = 0.01  # weight of the L1 part of "l2_l1" (TAG's factor)
    layer_weights: str = "equal"  # per-tensor weights of the distance: equal, linear, exp
    reg: float = 1.0  # α_reg of the embedding-norm regulariser
    size: float = 0.0  # its target norm s; 0 = mean norm of the vocabulary's embeddings, <0 = off
    init: str = "random"  # "random" Gaussian embeddings, or "bag": embeddings of bag tokens
    init_candidates: int = 20  # random starts scored (and as many permutations); paper: 500
    swap_every: int = 75  # steps between discrete steps; 0 = none
    swap_burnin: float = 0.1  # share of the steps before the first discrete step
    swap_candidates: int = 50  # transformations tried per sentence and discrete step; paper: 200
    prior: str = "ngram"  # language prior of the discrete steps (fedleak.lm): ngram, none
    prior_weight: float = 0.2  # α_lm: weight of the mean per-token NLL
    prior_order: int = 3  # n of the n-gram prior
    corpus: str = ""  # the n-gram prior's text ("" = WikiText-2 in $FEDLEAK_DATA_ROOT, see lm)
    bag: bool = True  # restrict tokens to the non-zero rows of the word-embedding update
    labels: str = "bias_corrected"  # label recovery strategy (fedleak.attacks._labels)
    known_labels: tuple[int, ...] = ()  # LAMP's assumption: the labels, given (one per sentence)
    known_lengths: tuple[int, ...] = ()  # LAMP's assumption: tokens per sentence, given
    batch: int = 0  # sentences to reconstruct; 0 = as many as the client reports
    unroll: bool | str = "auto"  # unroll the client's local steps ("auto": when it took several)
    grad_clip: float = 0.0  # clip the embeddings' gradient norm (0 = off)

    def __post_init__(self) -> None:
        name = self.name  # type: ignore[attr-defined]  # set by ATTACKS.register
        checks = {
            "steps": (self.steps >= 1, ">= 1"),
            "lr": (self.lr > 0, "> 0"),
            "lr_decay": (0 < self.lr_decay <= 1, "in (0, 1]"),
            "l1": (self.l1 >= 0, ">= 0"),
            "reg": (self.reg >= 0, ">= 0"),
            "init_candidates": (self.init_candidates >= 1, ">= 1"),
            "swap_every": (self.swap_every >= 0, ">= 0 (0 = no discrete steps)"),
            "swap_burnin": (0 <= self.swap_burnin < 1, "in [0, 1)"),
            "swap_candidates": (self.swap_candidates >= 2, ">= 2"),
            "prior_weight": (self.prior_weight >= 0, ">= 0"),
            "batch": (self.batch >= 0, ">= 0 (0 = the client's count)"),
            "grad_clip": (self.grad_clip >= 0, ">= 0 (0 = off)"),
        }
        for option, (ok, rule) in checks.items():
            if not ok:
                raise ValueError(f"{name}: {option} must be {rule}, got {getattr(self, option)}")
        choices = {
            "distance": (self.distance, TEXT_DISTANCES),
            "layer_weights": (self.layer_weights, LAYER_WEIGHTS),
            "init": (self.init, INITS),
            "prior": (self.prior, tuple(lm.PRIORS.names())),
        }
        for option, (value, known) in choices.items():
            if value not in known:
                raise ValueError(
                    f"{name}: {option} {value!r} unknown; choose one of {', '.join(known)}"
                )
        _labels.check(self.labels, name)
        if self.unroll not in (True, False, "auto"):
            raise ValueError(f"{name}: unroll must be true, false or 'auto', got {self.unroll!r}")
        if any(n < 2 for n in self.known_lengths):
            raise ValueError(
                f"{name}: known_lengths count [CLS] and [SEP], so each must be >= 2, "
                f"got {list(self.known_lengths)}"
            )
        if any(y < 0 for y in self.known_labels):
            raise ValueError(f"{name}: known_labels must be >= 0, got {list(self.known_labels)}")
        if self.prior == "ngram":  # checks the options now; the model is built on first use
            lm.NGram(order=self.prior_order, corpus=self.corpus)

    def __call__(self, view: ServerView, rng: torch.Generator) -> Reconstruction:
        """Reconstruct the client's sentences as token ids ``[B, max_len]``.

        ``info``: ``loss`` (best objective), ``steps`` (taken), ``seconds``, ``it_per_s``, ``swaps``
        (accepted transformations), ``bag_size``, ``labels_known``, ``lengths_known``,
        ``prior`` (1 if a language prior was used), ``init_loss``.
        Randomness comes from ``rng`` only.
        """
        return self._run(view, rng, None)

    # -- the engine ---------------------------------------------------------------------------

    def _run(self, view: ServerView, rng: torch.Generator, truth: Batch | None) -> Reconstruction:
        start = time.perf_counter()
        problem = self._problem(view)
        self._setup(problem, rng, truth)
        free = self._initialise(problem, rng)
        best, best_loss, swaps, done = self._optimise(problem, free, rng)
        outputs = self._outputs(problem, best)
        seconds = time.perf_counter() - start
        ids = problem.ids(best)
        out = torch.full(
            (len(ids), view.task.input_shape[0]), problem.special.pad, device=ids.device
        )
        out[:, : problem.width] = ids[:, : out.shape[1]]
        info = {
            "loss": best_loss,
            "steps": float(done),  # fewer than asked only if the objective became non-finite
            "seconds": seconds,
            "it_per_s": done / seconds,
            "swaps": float(swaps),
            "labels_known": float(bool(self.known_labels)),
            "lengths_known": float(problem.lengths_known),
            **problem.info,
        }
        return Reconstruction(inputs=out, labels=problem.labels, info=info, **outputs)

    def _problem(self, view: ServerView) -> Problem:
        """Everything fixed before optimising: model, labels, lengths, vocabulary, prior."""
        name = self.name  # type: ignore[attr-defined]
        model = _text.text_model(view, name)
        embedding = model.hf.get_input_embeddings()
        table = embedding.weight.detach().clone()
        size = self.batch or view.num_examples
        if self.known_labels and len(self.known_labels) != size:
            raise ValueError(
                f"{name}: known_labels has {len(self.known_labels)} labels for {size} sentences"
            )
        if self.known_lengths and len(self.known_lengths) != size:
            raise ValueError(
                f"{name}: known_lengths has {len(self.known_lengths)} entries for {size} sentences"
            )
        max_len = view.task.input_shape[0]
        if any(n > max_len for n in self.known_lengths):
            raise ValueError(
                f"{name}: known_lengths {list(self.known_lengths)} exceed the task's "
                f"max_len={max_len}"
            )
        labels = (
            torch.tensor(self.known_labels, dtype=torch.long, device=view.device)
            if self.known_labels
            else _labels.recover(view, size, self.labels)
        )
        bag = _text.token_bag(view, model) if self.bag else None
        allowed = _text.vocabulary(view, bag)
        readable = None
        if self.known_lengths:
            lengths = torch.tensor(self.known_lengths, dtype=torch.long, device=view.device)
        else:
            readable = _text.max_length(view, model)
            longest = min(readable or max_len, max_len)
            lengths = torch.full((size,), longest, dtype=torch.long, device=view.device)
        # Update's copy of the model must not train the word embeddings: the attack feeds
        # embeddings, so that matrix gets no gradient (LAMP matches every other tensor).
        frozen = dataclasses.replace(view, build_model=_frozen_builder(view, embedding, model))
        holder: dict[str, Any] = {}
        update = Update(frozen, unroll=self.unroll, forward=lambda p, x: holder["run"](p, x))
        runner = _Embedded(update.model)
        buffers = {f"model.{k}": v for k, v in update.buffers.items()}

        def run(params: Mapping[str, Tensor], packed: Tensor) -> Tensor:
            state = {**buffers, **{f"model.{k}": v for k, v in params.items()}}
            return functional_call(runner, state, (packed,))

        holder["run"] = run
        prior = (
            lm.NGram(order=self.prior_order, corpus=self.corpus)
            if self.prior == "ngram"
            else lm.PRIORS[self.prior]()
        )
        problem = Problem(
            view=view,
            update=update,
            model=update.model,
            labels=labels,
            lengths=lengths,
            width=int(lengths.max()),
            table=table,
            allowed=allowed,
            special=_text.specials(view),
            prior=prior.load(view.task.tokenizer),
            weights=layer_weights(len(update.names), self.layer_weights),
            # one sentence's length is exact when the position embeddings' update is readable
            lengths_known=bool(self.known_lengths) or (size == 1 and readable is not None),
            # s = 0: the mean norm of the allowed tokens' embeddings (LAMP's 1.4 for BERT-base)
            size=self.size or float(table[allowed].norm(dim=1).mean()),
        )
        problem.info["bag_size"] = float(len(bag)) if bag is not None else math.nan
        problem.info["prior"] = float(not isinstance(problem.prior, lm.NoPrior))
        return problem

    def _initialise(self, problem: Problem, rng: torch.Generator) -> Tensor:
        """The starting embeddings ``[B, T, H]`` (and, if unknown, the sentences' lengths)."""
        shape = (len(problem.labels), problem.width, problem.table.shape[1])
        size = problem.size
        sample_lengths = not problem.lengths_known and self.init_candidates > 1
        best, best_loss, best_lengths = None, math.inf, problem.lengths
        vocab = len(problem.allowed)
        for _ in range(self.init_candidates):
            if self.init == "bag":
                pick = torch.randint(vocab, shape[:2], generator=rng).to(problem.allowed.device)
                free = problem.table[problem.allowed[pick]].clone()
            else:
                free = torch.randn(shape, generator=rng).to(problem.table.device)
            if self.size >= 0:
                free = free / free.norm(dim=-1, keepdim=True) * size
            lengths = self._draw_lengths(problem, rng) if sample_lengths else problem.lengths
            loss = self._match(problem, free, lengths).item()
            if loss < best_loss:
                best, best_loss, best_lengths = free, loss, lengths
        problem.lengths = best_lengths
        if self.init_candidates > 1:  # LAMP: then as many random reorderings of the best
            words = problem.words()
            for _ in range(self.init_candidates):
                order = self._shuffle(problem, words, rng)
                free = best[torch.arange(shape[0], device=best.device)[:, None], order]
                loss = self._match(problem, free).item()
                if loss < best_loss:
                    best, best_loss = free, loss
        problem.info["init_loss"] = best_loss
        return best.detach().clone().requires_grad_()

    def _draw_lengths(self, problem: Problem, rng: torch.Generator) -> Tensor:
        """Random lengths: one sentence is the longest, the others any length up to it.

        Lengths that leave no room for every bag word (each occurs at least once) are redrawn.
        """
        count, longest = len(problem.labels), problem.width
        device, low = problem.labels.device, min(3, longest)
        has_bag = not math.isnan(problem.info.get("bag_size", math.nan))
        need = len(problem.allowed) if has_bag else 0
        for _ in range(100):
            lengths = torch.randint(low, longest + 1, (count,), generator=rng).to(device)
            lengths[int(torch.randint(count, (1,), generator=rng))] = longest
            if int((lengths - 2).sum()) >= need:
                return lengths
        return torch.full((count,), longest, dtype=torch.long, device=device)

    @staticmethod
    def _shuffle(problem: Problem, words: Tensor, rng: torch.Generator) -> Tensor:
        """Per sentence, a random permutation of its word positions (others fixed): ``[B, T]``."""
        order = torch.arange(words.shape[1], device=words.device).repeat(len(words), 1)
        for row in range(len(words)):  # B rows: a handful
            idx = words[row].nonzero().flatten()
            order[row, idx] = idx[torch.randperm(len(idx), generator=rng).to(idx.device)]
        return order

    def _predict(
        self, problem: Problem, free: Tensor, lengths: Tensor | None = None, graph: bool = False
    ) -> list[Tensor]:
        """The update the candidate embeddings predict (``graph``: differentiable w.r.t. them)."""
        packed = problem.pack(problem.assemble(free, lengths), lengths)
        update = problem.update
        if update.unrolled or graph:
            return update(packed, problem.labels)
        # One gradient without a graph for the second derivative: a third of the cost.
        loss = problem.view.loss_fn(update.logits(packed), problem.labels)
        return list(torch.autograd.grad(loss, [update.params[n] for n in update.names]))

    def _match(self, problem: Problem, free: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Gradient distance of a candidate, without a graph (for scoring)."""
        with torch.enable_grad():
            predicted = self._predict(problem, free.detach(), lengths)
        return self._distance(problem, [p.detach() for p in predicted]).detach()

    def _distance(self, problem: Problem, predicted: list[Tensor]) -> Tensor:
        observed = problem.update.observed
        if self.distance != "cosine_layers":
            return distance(predicted, observed, self.distance, problem.weights, l1=self.l1)
        # LAMP_Cos: every parameter tensor's direction counts equally, whatever its size.
        dots = torch.stack([(p * o).sum() for p, o in zip(predicted, observed, strict=True)])
        pp = torch.stack([p.pow(2).sum() for p in predicted])
        oo = torch.stack([o.pow(2).sum() for o in observed])
        # The layer weights are CPU float64 (layer_weights); an all-zero tensor has no direction.
        weights = problem.weights.to(dots) * (oo > 0)
        cosines = dots / (pp.sqrt() * oo.sqrt()).clamp_min(1e-20)
        return (weights * (1 - cosines)).sum() / weights.sum().clamp_min(1e-20)

    def _objective(self, problem: Problem, free: Tensor, step: int) -> Tensor:
        """The continuous objective: gradient distance + norm regulariser + subclass terms."""
        problem.captured.clear()
        loss = self._distance(problem, self._predict(problem, free, graph=True))
        if self.reg and self.size >= 0:
            norms = free.norm(dim=-1)[problem.words()]
            loss = loss + self.reg * (norms.mean() - problem.size).square()
        extra = self._extra(problem, free, step)
        return loss if extra is None else loss + extra

    def _optimise(
        self, problem: Problem, free: Tensor, rng: torch.Generator
    ) -> tuple[Tensor, float, int, int]:
        optimizer = torch.optim.Adam([free], lr=self.lr)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, DECAY_EVERY, gamma=self.lr_decay)
        best, best_loss, swaps, done = free.detach().clone(), math.inf, 0, 0
        for step in range(self.steps):
            optimizer.zero_grad()
            loss = self._objective(problem, free, step)
            (grad,) = torch.autograd.grad(loss, [free])
            if self.grad_clip and grad.norm() > self.grad_clip:
                grad = grad * (self.grad_clip / (grad.norm() + 1e-6))
            free.grad = grad
            value = loss.item()
            if value <= best_loss:  # the objective of the embeddings before this step
                best, best_loss = free.detach().clone(), value
            if not math.isfinite(value):
                break
            done = step + 1
            optimizer.step()
            schedule.step()
            burnt_in = step >= self.swap_burnin * self.steps
            # LAMP swaps when step % swap_every == 1 (1 % 1 = 0: every step for swap_every 1).
            if self.swap_every and burnt_in and step % self.swap_every == 1 % self.swap_every:
                swaps += self._swap(problem, free, rng)
        return best, best_loss, swaps, done

    # -- discrete steps -----------------------------------------------------------------------

    def _swap(self, problem: Problem, free: Tensor, rng: torch.Generator) -> int:
        """One discrete step over every sentence; returns how many changed."""
        changed = 0
        ids = problem.ids(free)
        tokens = (problem.lengths - 1).clamp_min(1)
        nll = problem.prior.nll(ids, problem.lengths)  # [B]
        for row in range(len(ids)):
            n = int(problem.lengths[row]) - 2
            if n < 2:
                continue
            perms = _transformations(
                n, self.swap_candidates, rng, free.device
            )  # [K, n], row 0 = identity
            positions = perms + 1
            words = free.detach()[row, positions]  # [K, n, H]
            candidates = ids[row].expand(len(perms), -1).clone()
            candidates[:, 1 : n + 1] = ids[row, positions]
            lengths = problem.lengths[row].expand(len(perms))
            # The prior of the whole batch per token, as LAMP's LM loss is: only this row varies.
            others = float(nll.sum() - nll[row])
            prior = (others + problem.prior.nll(candidates, lengths)) / float(tokens.sum())
            scores = self._candidate_losses(problem, free.detach(), row, words)
            # The prior scores on the CPU (lm.Scorer); the distances are on the view's device.
            total = scores + self.prior_weight * prior.to(scores)
            extra = self._candidate_extra(problem, free.detach(), row, words)
            if extra is not None:
                total = total + extra.to(total.dtype)
            best = int(total.argmin())
            if best != 0:
                with torch.no_grad():
                    free[row, 1 : n + 1] = words[best]
                ids[row] = candidates[best]
                nll[row] = problem.prior.nll(candidates[best : best + 1], lengths[:1])[0]
                changed += 1
        return changed

    def _candidate_losses(self, problem: Problem, free: Tensor, row: int, words: Tensor) -> Tensor:
        """Gradient distances ``[K]`` of the batch, row ``row``'s words set to each of ``words``.

        ``words`` is ``[K, n, H]``.
        """
        count = len(free)
        n = words.shape[1]
        if problem.update.unrolled:  # the local steps mix the sentences: predict each batch
            losses = []
            for candidate in words:
                trial = free.clone()
                trial[row, 1 : n + 1] = candidate
                losses.append(self._match(problem, trial))
            return torch.stack(losses)
        # FedSGD: the batch gradient is the mean of per-sentence gradients, so the other
        # sentences' share is computed once and each candidate costs one sentence's gradient.
        update = problem.update
        params = [update.params[name] for name in update.names]
        others = [i for i in range(count) if i != row]
        rest = None
        if others:
            sub = problem.pack(problem.assemble(free)[others], problem.lengths[others])
            loss = problem.view.loss_fn(update.logits(sub), problem.labels[others])
            rest = [g * len(others) for g in torch.autograd.grad(loss, params)]
        length = int(problem.lengths[row])
        base = problem.assemble(free)[row : row + 1, :length]
        mask = torch.ones(1, length, 1, device=base.device)
        label = problem.labels[row : row + 1]
        losses = []
        for candidate in words:
            embeds = base.clone()
            embeds[0, 1 : n + 1] = candidate
            loss = problem.view.loss_fn(update.logits(torch.cat([embeds, mask], -1)), label)
            grads = torch.autograd.grad(loss, params)
            if rest is not None:
                grads = [(g + r) / count for g, r in zip(grads, rest, strict=True)]
            losses.append(self._distance(problem, list(grads)).detach())
        return torch.stack(losses)

    # -- hooks for subclasses (the pooler attack) ---------------------------------------------

    def _setup(self, problem: Problem, rng: torch.Generator, truth: Batch | None) -> None:
        """Before initialisation: e.g. recover features, register hooks on ``problem.model``."""

    def _extra(self, problem: Problem, free: Tensor, step: int) -> Tensor | None:
        """Extra terms of the continuous objective, after the update was predicted."""
        return None

    def _candidate_extra(
        self, problem: Problem, free: Tensor, row: int, words: Tensor
    ) -> Tensor | None:
        """Extra scores ``[K]`` of a discrete step's candidates, or None.

        Candidate ``k`` is the batch with row ``row``'s words set to ``words[k]``; its score
        adds to the gradient distance and the prior.
        """
        return None

    def _outputs(self, problem: Problem, best: Tensor) -> dict[str, Any]:
        """Extra fields of the :class:`Reconstruction` (e.g. recovered features).

        ``best`` are the final embeddings; ``problem.info`` may still be added to.
        """
        return {}


def _frozen_builder(view: ServerView, embedding: nn.Module, model: nn.Module):
    """``view.build_model`` with the word embeddings frozen (the attack feeds embeddings)."""
    name = _text.parameter_name(model, embedding)

    def build() -> nn.Module:
        fresh = view.build_model()
        fresh.get_parameter(name).requires_grad_(False)
        return fresh

    return build


def _transformations(
    n: int, count: int, rng: torch.Generator, device: torch.device | str = "cpu"
) -> Tensor:
    """``count`` reorderings ``[count, n]`` of ``n`` word positions.

    The identity first, then LAMP's four kinds in turn: swap two tokens, move a token, move a
    span, move a prefix to the end.
    """
    draws = torch.randint(0, 1 << 30, (count, 3), generator=rng).tolist()
    perms = []
    for k, (a, b, c) in enumerate(draws):
        p = list(range(n))
        kind = k % 4
        if k == 0:
            pass
        elif kind == 0:  # swap two tokens
            i, j = a % n, b % n
            p[i], p[j] = p[j], p[i]
        elif kind == 1:  # move one token elsewhere
            i, j = a % n, b % n
            p.insert(j, p.pop(i))
        elif kind == 2:  # move a span elsewhere
            i, j = sorted((a % n, b % n))
            span, rest = p[i : j + 1], p[:i] + p[j + 1 :]
            at = c % (len(rest) + 1)
            p = rest[:at] + span + rest[at:]
        else:  # move a prefix to the end
            i = 1 + a % (n - 1)
            p = p[i:] + p[:i]
        perms.append(p)
    return torch.tensor(perms, dtype=torch.long, device=device)
