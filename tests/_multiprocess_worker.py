"""One process of the two-process checks in tests/test_multiprocess.py (also runs alone).

    python tests/_multiprocess_worker.py sft|ppo <process_id> <num_processes> <port> <out>

Each process owns 2 CPU devices; with 2 processes the mesh spans 4 devices on localhost over
jax.distributed (gloo CPU collectives).

* sft: every process feeds its own rows of the global batch (`process_shard`); the loss and
  gradient norm of 3 SFT steps are written to <out> (JSON) by process 0.
* ppo: `train_ppo` on a tiny policy and PM for 2 iterations with a checkpoint after each, in the
  folder <out> (shared by the processes, as a multi-host run shares its workdir); process 0 writes
  metrics.jsonl, samples.jsonl and the final params (<out>/params.npz). With a third argument
  after <out>, "resume", the run stops after 1 iteration first and is continued in a second call.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import functools  # noqa: E402
import logging  # noqa: E402

import numpy as np  # noqa: E402

from cai_jax import sharding  # noqa: E402
from cai_jax.models import Transformer, init_params, tiny_config  # noqa: E402
from cai_jax.train.loop import jit_train_step, state_shardings  # noqa: E402
from cai_jax.train.state import TrainState, make_optimizer  # noqa: E402
from cai_jax.train.steps import sft_step  # noqa: E402
from tests.defaults import optim_config  # noqa: E402


def sft(out: str) -> None:
    cfg = tiny_config("llama")
    model = Transformer(cfg)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=1, tensor=1))
    params = init_params(cfg, jax.random.key(0))
    p_shard = sharding.param_shardings(model, np.zeros((1, 8), np.int32), mesh)
    params = sharding.shard_params(params, p_shard)
    optimizer = make_optimizer(
        optim_config(lr=1e-3, warmup_steps=0, grad_clip_norm=1.0, schedule="constant", updates=3), params
    )
    create = lambda p: TrainState.create(p, optimizer, jax.random.key(1))  # noqa: E731
    s_shard = state_shardings(jax.eval_shape(create, params), p_shard, mesh)
    state = jax.jit(create, out_shardings=s_shard)(params)
    step = jit_train_step(
        functools.partial(sft_step, model=model, optimizer=optimizer),
        s_shard,
        {k: sharding.batch_sharding(mesh) for k in ("tokens", "mask", "loss_mask")},
        mesh,
    )
    rng = np.random.default_rng(0)
    losses, grad_norms = [], []
    for _ in range(3):
        tokens = rng.integers(3, cfg.vocab_size, (8, 16)).astype(np.int32)
        loss_mask = np.zeros((8, 16), bool)
        loss_mask[:, 8:] = True
        full = {"tokens": tokens, "mask": np.ones((8, 16), bool), "loss_mask": loss_mask}
        start, stop = sharding.process_shard(8)
        batch = sharding.global_batch({k: v[start:stop] for k, v in full.items()}, mesh)
        state, metrics = step(state, batch)
        losses.append(float(jax.device_get(metrics["loss"])))
        grad_norms.append(float(jax.device_get(metrics["grad_norm"])))
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump({"loss": losses, "grad_norm": grad_norms, "devices": jax.device_count()}, f)


def ppo(out: str, resume: bool) -> None:
    from cai_jax.checkpoints.train_state import CheckpointConfig
    from cai_jax.train.ppo import train_ppo
    from tests.defaults import ppo_config
    from tests.test_ppo import _lm, _pm, _prompts

    cfg = tiny_config("llama")
    policy, pm, prompts = _lm(cfg), _pm(cfg), _prompts(16)  # tests/test_ppo.py's tiny policy, PM and prompts
    ppo_cfg = ppo_config(
        rollout_batch_size=8, minibatch_size=8, micro_batch_size=4, ppo_epochs=2, max_new_tokens=8,
        kl_coef=0.1, missing_eos_penalty=0.5, value_init="pm", sample_every=1, num_samples_logged=2,
    )  # fmt: skip
    optim = optim_config(lr=1e-3, warmup_steps=0, grad_clip_norm=1.0, schedule="constant", updates=8)
    for n in (1, 2) if resume else (2,):
        state = train_ppo(
            policy, policy, pm, prompts, ppo_cfg=ppo_cfg, optim_cfg=optim, num_iterations=n, seed=0, workdir=out,
            ckpt_cfg=CheckpointConfig(directory=os.path.join(out, "checkpoints"), save_every_steps=1, keep_last=None, async_save=False),
        )  # fmt: skip
    flat = jax.tree_util.tree_flatten_with_path(sharding.to_host(state.params))[0]
    if jax.process_index() == 0:
        np.savez(os.path.join(out, "params.npz"), **{jax.tree_util.keystr(k): v for k, v in flat})
        with open(os.path.join(out, "devices.json"), "w") as f:
            json.dump({"devices": jax.device_count(), "processes": jax.process_count()}, f)


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the fit loop's "resumed from" line on stderr
    job, pid, nproc, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    if nproc > 1:
        sharding.initialize_distributed(
            {"coordinator_address": f"localhost:{port}", "num_processes": nproc, "process_id": pid}
        )
    if job == "sft":
        sft(out)
    else:
        ppo(out, resume=sys.argv[6:] == ["resume"])
    if nproc > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
