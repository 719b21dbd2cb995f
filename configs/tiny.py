r"""A random 2-layer model through the whole pipeline in about a minute on CPU (used by the tests).

    python -m experiments.launch --config configs/tiny.py --workdir runs/tiny

Weights are random (seeded); only the tokenizer comes from the embedded SmolLM2 checkpoint, so the
texts are noise: this config checks the machinery (every stage, resume, report), not the method.
"""

from configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.model.init = "random"
    # fp32 whatever the CPU: the tests that run this config compare numbers across machines.
    c.model.dtype = "float32"
    c.model.random_config.max_position_embeddings = 512
    c.checkpoint.save_every_steps = 2
    c.prompts.num_red_team = 10
    c.prompts.num_helpful = 4
    c.prompts.eval_fraction = 0.5
    c.revisions.update(num_revisions=2, max_new_tokens=8, helpful_max_new_tokens=8, batch_size=4)
    c.sft.update(num_steps=4, batch_size=4, seq_len=96, optim=base.optim(1e-3))
    c.feedback.update(max_new_tokens=8, batch_size=4)
    c.pm.pmp.update(num_steps=2, max_pairs_per_question=1, optim=base.optim(1e-3))
    c.pm.update(num_steps=4, batch_size=2, seq_len=96, eval_fraction=0.5, optim=base.optim(1e-3))
    c.ppo.update(
        num_iterations=3,
        rollout_batch_size=4,
        minibatch_size=2,
        micro_batch_size=2,
        ppo_epochs=1,
        max_new_tokens=8,
        sample_every=1,
        optim=base.optim(1e-4),
    )
    c.rloo.update(
        num_iterations=3,
        rollout_batch_size=2,
        k=2,
        minibatch_size=4,
        micro_batch_size=2,
        max_new_tokens=8,
        sample_every=1,
        optim=base.optim(1e-4),
    )
    c.dpo.update(num_steps=3, batch_size=2, seq_len=96, eval_every=1, optim=base.optim(1e-4))
    c.eval.update(num_prompts=2, max_new_tokens=8, n_bootstrap=20, elo_snapshots=(0, 1, -1))
    c.log.tensorboard = False
    return c
