r"""Paper-scale preset: an 8B Llama on one host with 8 GPUs (bf16 matmuls, FSDP over 8 devices).

    python -m experiments.launch --config configs/llama8b_gpu8.py --workdir runs/llama8b \
        --config.model.name=/path/to/Llama-3.1-8B-Instruct

`model.name` must be an HF-format folder (or a hub name already in the local HF cache): nothing is
downloaded. Memory plan (80 GB GPUs): fp32 master weights + AdamW moments of an 8B model are
~96 GB, sharded 8 ways = 12 GB per GPU; PPO holds policy + value (trained) and reference + PM
(frozen, fp32 storage: another 8 GB per GPU after sharding); activations are bounded by the micro
batch sizes below. Multi-host meshes: run the same command on every host with jax.distributed set
up (the launcher's --coordinator/--num-processes/--process-id or the cluster's environment) and
raise `mesh.data`; the PPO stage currently runs in one process (one host, all its devices).
"""

from configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.model.name = "meta-llama/Llama-3.1-8B-Instruct"  # hub name resolved from the local cache, or a folder
    c.model.dtype = "bfloat16"  # bf16 matmul inputs, fp32 accumulation
    c.model.param_dtype = "float32"  # fp32 master weights
    c.mesh.update(data=1, fsdp=8, tensor=1)  # ZeRO-3 style: parameters and optimizer state over 8 GPUs
    c.checkpoint.update(save_every_steps=200, keep_last=2)
    c.prompts.update(num_red_team=0, num_helpful=0, eval_fraction=0.1)  # every shipped (or given) prompt
    c.revisions.update(num_revisions=4, batch_size=64, max_new_tokens=256, helpful_max_new_tokens=256)
    c.sft.update(num_steps=2000, batch_size=64, seq_len=1024, packing=True, optim=base.optim(1e-5, warmup=100))
    c.feedback.update(batch_size=64, max_new_tokens=256, ensemble=4, swap=True)
    c.pm.pmp.update(num_steps=2000, optim=base.optim(1e-5, warmup=100))
    c.pm.update(num_steps=2000, batch_size=64, seq_len=1024, optim=base.optim(5e-6, warmup=100))
    c.ppo.update(
        num_iterations=500,
        rollout_batch_size=256,
        minibatch_size=64,
        micro_batch_size=8,
        ppo_epochs=2,
        max_new_tokens=256,
        generation_batch_size=128,
        optim=base.optim(1e-6, warmup=20),
    )
    c.rloo.update(
        num_iterations=500,
        rollout_batch_size=64,
        k=4,
        minibatch_size=256,
        micro_batch_size=8,
        max_new_tokens=256,
        generation_batch_size=128,
        optim=base.optim(1e-6, warmup=20),
    )
    c.dpo.update(num_steps=2000, batch_size=64, seq_len=1024, eval_every=100, optim=base.optim(5e-7, warmup=100))
    c.eval.update(num_prompts=256, max_new_tokens=256, elo_snapshots=(0, 100, 250, -1), n_bootstrap=1000)
    return c
