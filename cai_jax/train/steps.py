"""One pure train step per objective: SFT (SL-CAI) and the preference model.

    step(state, batch, *, model, optimizer, ...) -> (state, metrics)

No I/O and no Python branching on traced values (only on the batch's *structure*, e.g. whether
"segment_ids" is present, which is static under jit). Jit once, with the state donated:

    step = jax.jit(functools.partial(sft_step, model=model, optimizer=optimizer), donate_argnums=0)

Metrics are float32 scalars left on device; the loop fetches them (ideally one step late) and
calls `check_finite` on the host. Losses and log-probs are float32 whatever the compute dtype.

Shape letters: B batch (pairs for the PM), L sequence length, V vocabulary.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cai_jax.losses import masked_mean, pm_loss, sft_loss
from cai_jax.train.state import Optimizer, TrainState

__all__ = ["sft_step", "sft_loss_fn", "pm_step", "pm_scores", "eval_pm_batch", "check_finite"]


def _norm(tree) -> jax.Array:
    leaves = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(leaves, jnp.zeros((), jnp.float32)))


def _trainable_norm(grads, trainable) -> jax.Array:
    """Global L2 norm over the trainable leaves (what clipping sees)."""
    kept = [g for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(trainable)) if t]
    return _norm(kept)


def accumulated_grads(loss_fn, params, minibatch: dict, trainable) -> tuple:
    """Gradients and metrics of `loss_fn(params, mb) -> (loss, metrics)` summed over the leading
    (micro-batch) axis of `minibatch`, by a scan.

    Only the trainable leaves (`Optimizer.trainable`) are differentiated and accumulated; a frozen
    leaf's gradient is zeros made after the scan, so a frozen LoRA base costs no gradient memory.

    Returns:
      (grads like `params`, summed metrics).
    """
    leaves, treedef = jax.tree.flatten(params)
    flags = [bool(f) for f in jax.tree.leaves(trainable)]
    if len(flags) != len(leaves):
        raise ValueError(f"the trainable mask has {len(flags)} leaves, the params {len(leaves)}")
    train = [x for x, f in zip(leaves, flags) if f]
    frozen = [x for x, f in zip(leaves, flags) if not f]

    def join(t, fr):
        t, fr = iter(t), iter(fr)
        return jax.tree.unflatten(treedef, [next(t) if f else next(fr) for f in flags])

    grad_fn = jax.grad(lambda t, mb: loss_fn(join(t, frozen), mb), has_aux=True)

    def micro(acc, mb):
        return jax.tree.map(jnp.add, acc, grad_fn(train, mb)), None

    zeros = jax.eval_shape(grad_fn, train, jax.tree.map(lambda x: x[0], minibatch))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    (grads, metrics), _ = jax.lax.scan(micro, zeros, minibatch)
    return join(grads, [jnp.zeros_like(x) for x in frozen]), metrics


def _apply(state: TrainState, grads, optimizer: Optimizer) -> tuple[TrainState, dict]:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "grad_norm": _trainable_norm(grads, optimizer.trainable),
        "lr": optimizer.lr(state.step),
        "param_norm": _norm(params),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


# ---------------------------------------------------------------- SFT


def sft_loss_fn(params, batch: dict, *, model: nn.Module) -> tuple[jax.Array, dict]:
    """Next-token loss on the response tokens of a batch (SL-CAI, Bai et al. 2022, sec. 3).

    Position t predicts token t+1; the target counts when it is a real token (`mask`) and a
    response token (`loss_mask`). With packing, a target in a different segment from its input
    (the first token of the next sequence) never counts, whatever `loss_mask` says.

    Returns:
      (loss, metrics {"loss", "accuracy", "tokens"}) from `losses.sft_loss`.
    """
    tokens_BL = batch["tokens"]
    mask_BL = batch["mask"].astype(bool)
    segment_ids_BL = batch.get("segment_ids")
    logits_BLV = model.apply(
        {"params": params}, tokens_BL, mask_BL, positions_BL=batch.get("positions"), segment_ids_BL=segment_ids_BL
    )
    target_mask_BL = batch["loss_mask"][:, 1:].astype(bool) & mask_BL[:, 1:]
    if segment_ids_BL is not None:
        target_mask_BL = target_mask_BL & (segment_ids_BL[:, 1:] == segment_ids_BL[:, :-1])
    return sft_loss(logits_BLV[:, :-1], tokens_BL[:, 1:], target_mask_BL)


def sft_step(state: TrainState, batch: dict, *, model: nn.Module, optimizer: Optimizer) -> tuple[TrainState, dict]:
    """One SFT update.

    Args:
      state: the train state (params of `model`).
      batch: "tokens" [B, L] int32; "mask" [B, L] 1 on real tokens; "loss_mask" [B, L] 1 on
        response tokens; optional "segment_ids" [B, L] (packed rows, 0 = pad) and "positions"
        [B, L] (default: derived from the mask or the segments by the model).
      model: a `Transformer`.
      optimizer: from `make_optimizer`.

    Returns:
      (new state, metrics {"loss", "accuracy", "tokens", "grad_norm", "lr", "param_norm"}); the
      loss and accuracy are those of the params *before* the update; "lr" is the rate of the update
      this step contributes to; "grad_norm" is before clipping (micro-batch gradient under
      accumulation).
    """
    grad_fn = jax.value_and_grad(lambda p: sft_loss_fn(p, batch, model=model), has_aux=True)
    (_, loss_metrics), grads = grad_fn(state.params)
    state, opt_metrics = _apply(state, grads, optimizer)
    return state, {**loss_metrics, **opt_metrics}


# ---------------------------------------------------------------- preference model


def pm_scores(params, batch: dict, *, model: nn.Module) -> tuple[jax.Array, jax.Array]:
    """Scores (r_A [B], r_B [B]) of both responses of each pair, in one forward pass of 2B rows."""
    if batch["tokens_a"].shape != batch["tokens_b"].shape:
        raise ValueError(
            f"pm batch: tokens_a {batch['tokens_a'].shape} and tokens_b {batch['tokens_b'].shape} "
            "must have the same shape (pad both sides to one length)"
        )
    b = batch["tokens_a"].shape[0]
    tokens_2BL = jnp.concatenate([batch["tokens_a"], batch["tokens_b"]], axis=0)
    mask_2BL = jnp.concatenate([batch["mask_a"], batch["mask_b"]], axis=0).astype(bool)
    scores_2B = model.apply({"params": params}, tokens_2BL, mask_2BL)
    return scores_2B[:b], scores_2B[b:]


def pm_step(
    state: TrainState, batch: dict, *, model: nn.Module, optimizer: Optimizer, centering: float = 0.0
) -> tuple[TrainState, dict]:
    """One preference-model update on soft targets (Bai et al. 2022, sec. 4.1; `losses.pm_loss`).

    Args:
      state: the train state (params {"backbone", "head"} of a `ScalarModel`).
      batch: "tokens_a", "mask_a", "tokens_b", "mask_b" [B, L] (same L; left or right padding);
        "p" [B] float, the probability that A is preferred; optional "pair_mask" [B] (1 on real
        pairs, for batches padded to a fixed size).
      model: a `ScalarModel` (score read at the last real token).
      optimizer: from `make_optimizer`.
      centering: coefficient of the reward-centering term of `pm_loss` (0 disables it).

    Returns:
      (new state, metrics {"loss", "bce", "accuracy", "margin", "p_mean", "reward_mean",
      "reward_std", "grad_norm", "lr", "param_norm"}); loss and reward statistics are those of the
      params before the update, reward statistics over the 2B scores of real pairs.
    """
    pair_mask_B = batch.get("pair_mask")

    def loss_fn(params):
        r_a_B, r_b_B = pm_scores(params, batch, model=model)
        loss, metrics = pm_loss(r_a_B, r_b_B, batch["p"], centering, mask_B=pair_mask_B)
        return loss, (metrics, jax.lax.stop_gradient(jnp.concatenate([r_a_B, r_b_B])))

    (_, (loss_metrics, r_2B)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, opt_metrics = _apply(state, grads, optimizer)
    w_2B = jnp.ones_like(r_2B) if pair_mask_B is None else jnp.tile(pair_mask_B, 2)
    mean = masked_mean(r_2B, w_2B)
    std = jnp.sqrt(masked_mean(jnp.square(r_2B - mean), w_2B))
    return state, {**loss_metrics, "reward_mean": mean, "reward_std": std, **opt_metrics}


def eval_pm_batch(params, batch: dict, *, model: nn.Module) -> dict[str, jax.Array]:
    """Per-pair PM outputs for evaluation (accuracy, calibration, reward statistics).

    Returns:
      {"r_a" [B], "r_b" [B], "prob_a" [B] = sigmoid(r_a - r_b)}, float32.
    """
    r_a_B, r_b_B = pm_scores(params, batch, model=model)
    return {"r_a": r_a_B, "r_b": r_b_B, "prob_a": jax.nn.sigmoid(r_a_B - r_b_B)}


# ---------------------------------------------------------------- host side


def check_finite(metrics: dict, step: int, batch_id=None, *, unit: str = "step") -> None:
    """Host-side guard: raises FloatingPointError when the loss (or the gradient norm) is not finite.

    Call it from the loop on fetched metrics; it blocks on the values. The step that produced a
    non-finite loss has already applied its update, so the loop must not save that state. `unit`
    names what `step` counts in the message ("step"; PPO: "iteration").
    """
    where = f"{unit} {int(step)}" + ("" if batch_id is None else f" (batch {batch_id})")
    loss = float(np.asarray(metrics["loss"]))
    if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite loss at {where}: loss={loss}")
    if "grad_norm" in metrics:
        grad_norm = float(np.asarray(metrics["grad_norm"]))
        if not np.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite grad_norm at {where}: loss={loss}, grad_norm={grad_norm}")
