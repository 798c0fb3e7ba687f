"""One round of federated learning, without Flower: what the server and a client each do.

The simulation layer (:mod:`fedleak.sim`) moves these pieces between processes with Flower;
here they are plain functions, so the protocol, its seeds and its defenses can be tested and
reused without a federation runtime.

* the server samples clients, applies its modifiers to the global model, tells every sampled
  client its strategy's instructions (and a public per-round seed), and evaluates the model;
* a client selects its examples (if it has a selector), trains on them (training defenses wrap
  the training), then applies its update defenses to ``received - sent`` before replying with
  its state and its declared messages;
* the server strategy turns the replies into the next global state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fedleak import seeding
from fedleak.config import Experiment
from fedleak.core import Batch, Messages, Params, Reply, Secrets, TrainResult, sends


class Diverged(RuntimeError):
    """Training stopped being finite: a result of the experiment, not a crash.

    Too large a learning rate, or a defense that injects NaN; reported as such, never scored
    as if the NaN model were real.
    """


NON_FINITE = "update is not finite"  # how a failed client's reason marks a divergence


def non_finite(params: Params) -> list[str]:
    """The floating-point tensors of ``params`` that hold a NaN or an infinity."""
    return [k for k, v in params.items() if v.is_floating_point() and not bool(v.isfinite().all())]


def require_finite(params: Params, what: str) -> None:
    """Raise :class:`Diverged` ("``what`` is not finite (tensor ...); ...") if ``params`` is not."""
    if bad := non_finite(params):
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise Diverged(
            f"{what} is not finite ({bad[0]}{more}); lower training.lr, or check the defenses' "
            "options"
        )


def sample_clients(exp: Experiment, round: int) -> list[int]:
    """The clients taking part in ``round``, sorted (uniform without replacement)."""
    fed = exp.federation
    order = torch.randperm(fed.clients, generator=seeding.rng(exp.seed, "sample", round))
    return sorted(order[: fed.clients_per_round].tolist())


def observed_clients(exp: Experiment, round: int, clients: list[int]) -> list[int]:
    """The sampled clients whose updates the server records in ``round``."""
    if not exp.observe.round(round):
        return []
    return clients[: exp.observe.clients_per_round or len(clients)]


def server_model(exp: Experiment, round: int, params: Params) -> tuple[Params, Secrets]:
    """Apply the server's modifiers (in config order) to the global state it is about to send."""
    secrets: dict = {}
    for i, modifier in enumerate(exp.modifiers):
        if modifier.applies_to(round):
            params, planted = modifier(params, round, seeding.rng(exp.seed, "modifier", i, round))
            secrets.update(planted)
    return params, secrets


SEED = "seed"  # the public per-round seed every instruction set carries


def instructions(exp: Experiment, round: int, params: Params) -> dict[str, torch.Tensor]:
    """What every client sampled in ``round`` receives beside the model.

    A public seed all of them share (for a shared sketch, zeroth-order directions, ...), then
    whatever the server strategy asks, under the names it declares.
    """
    seed = torch.tensor(seeding.derive(exp.seed, "shared", round), dtype=torch.int64)
    asked = exp.server.instructions(round, params, seeding.rng(exp.seed, "server", round))
    declared(asked, exp.server, "[server]", "its instructions")
    return {SEED: seed, **asked}


def declared(messages: Messages, plugin, where: str, what: str) -> None:
    """Refuse tensors a plugin sends without declaring them (the leakage surface is explicit)."""
    if extra := sorted(set(messages) - set(sends(plugin))):
        raise RuntimeError(
            f"{where} {plugin.name!r} sends {extra[0]!r} in {what} without declaring it in its "
            f"`sends` (declared: {sorted(sends(plugin)) or 'nothing'})"
        )


def initial_params(exp: Experiment) -> Params:
    """The global model's state before round 1."""
    return {k: v.detach().clone() for k, v in exp.build_model().state_dict().items()}


@torch.no_grad()
def evaluate(exp: Experiment, params: Params, batch_size: int = 512) -> dict[str, float]:
    """Global test loss and accuracy of ``params``, computed on the experiment's device.

    Where the test set has group ids, also the accuracy of its worst group (group robustness).
    """
    device = exp.device
    model = exp.build_model().to(device)
    model.load_state_dict(params)
    model.eval()
    test = exp.dataset().test
    loss, hits = 0.0, []
    for start in range(0, len(test), batch_size):
        x, y = test.inputs[start : start + batch_size], test.labels[start : start + batch_size]
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += float(exp.loss_fn(logits, y, reduction="sum"))
        hits.append((logits.argmax(-1) == y).cpu())
    correct = torch.cat(hits).double()
    metrics = {"test_loss": loss / len(test), "test_accuracy": float(correct.mean())}
    if test.groups is not None:
        groups = test.groups.cpu()
        metrics["worst_group_accuracy"] = min(
            float(correct[groups == g].mean()) for g in groups.unique()
        )
    return metrics


@dataclass(frozen=True)
class Update:
    """A client's reply: its new state (defenses applied), its messages and what it reports.

    ``params`` is the client's state; when its trainer sends no model (``sends_model`` False)
    the client keeps it, and the server rebuilds it with :func:`received`.
    """

    params: Params
    result: TrainResult
    messages: Messages

    @property
    def sends_model(self) -> bool:
        """Whether ``params`` leave the client."""
        return bool(self.params)

    @property
    def truth(self) -> Batch:
        """The examples it trained on (only the simulation's truth channel carries them)."""
        return self.result.used


def local_update(
    exp: Experiment, client: int, round: int, sent: Params, orders: Messages | None = None
) -> Update:
    """Everything a client does in one round: select, train, then defend what it sends.

    ``orders`` are the round's :func:`instructions` (computed here when not given, as the
    server would).  Selection, training and defenses run on the experiment's device; the
    reply (state, messages, the examples used) comes back on the CPU, for Flower's
    serialisation and the run directory.
    """
    device = exp.device
    orders = instructions(exp, round, sent) if orders is None else orders
    orders = {k: v.to(device) for k, v in orders.items()}
    model = exp.build_model().to(device)
    model.load_state_dict(sent)
    data = exp.client_data(client).to(device)
    messages: dict[str, torch.Tensor] = {}
    if exp.selection is not None:
        chosen = exp.selection.select(
            model, data, exp.loss_fn, seeding.rng(exp.seed, "select", client, round), orders
        )
        declared(chosen.messages, exp.selection, "[selection]", "its messages")
        messages.update(chosen.messages)
        data = data.select(chosen.indices)
    result = exp.trainer.fit(
        model,
        data,
        exp.loss_fn,
        seeding.rng(exp.seed, "train", client, round),
        exp.training_defenses,
        instructions=orders,
    )
    declared(result.messages, exp.trainer, "[training]", "its messages")
    messages.update(result.messages)
    messages = {k: v.detach().cpu() for k, v in messages.items()}
    require_finite(messages, f"client {client}, round {round}: its messages")
    result = replace(result, used=result.used.to("cpu"), messages={})
    if not getattr(exp.trainer, "sends_model", True):
        return Update({}, result, messages)
    state = model.state_dict()
    start = {k: v.to(device) for k, v in sent.items()}
    delta = {k: state[k].detach() - v for k, v in start.items() if v.is_floating_point()}
    rng = seeding.rng(exp.seed, "defense", client, round)
    for defense in exp.update_defenses:
        delta = defense(delta, rng)
    params = {
        k: (start[k] + delta[k] if k in delta else v.detach().clone()).cpu()
        for k, v in state.items()
    }
    # Raised, so the runtime reports a failed client and the server leaves it out: a NaN
    # update averaged in would poison the global model.  The wording carries NON_FINITE.
    require_finite(params, f"client {client}, round {round}: its update")
    return Update(params, result, messages)


def received(exp: Experiment, sent: Params, params: Params, messages: Messages) -> Params:
    """A client's state as the server holds it: as sent, or rebuilt from its messages."""
    if params:
        return params
    return exp.trainer.replay(sent, messages, exp.build_model)


def reply(exp: Experiment, client: int, sent: Params, update: Update) -> Reply:
    """A client's update as the server strategy sees it (state rebuilt when not sent)."""
    return Reply(
        client=client,
        params=received(exp, sent, update.params, update.messages),
        num_examples=len(update.result.used),
        loss=update.result.loss,
        messages=update.messages,
    )
