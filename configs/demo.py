r"""The whole Constitutional AI pipeline on the embedded SmolLM2-135M-Instruct, sized for 2 CPU cores.

    python -m experiments.launch --config configs/demo.py --workdir runs/demo

(`python3 run.py demo` runs exactly this.) Target: under 30 minutes on a 2-core laptop CPU; the
measured stage breakdown is in BENCHMARKS.md. Sizes are a few percent of base.py's: a 135M model
trained for tens of steps shows the machinery and the direction of the effects, not the paper's
magnitudes.
"""

from configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.checkpoint.save_every_steps = 10
    c.prompts.num_red_team = 40  # 30 train (18 revised, all 30 labelled by the feedback model) + 10 held out
    c.prompts.num_helpful = 16  # 12 train + 4 held out
    # 135M at T = 1 drifts into noise within a few dozen tokens; 0.7 / 0.9 keeps it on topic.
    c.revisions.update(
        num_prompts=18,
        num_revisions=2,
        temperature=0.7,
        top_p=0.9,
        max_new_tokens=64,
        helpful_max_new_tokens=64,
        batch_size=18,
    )
    c.sft.update(num_steps=12, batch_size=4, seq_len=256, packing=True, optim=base.optim(2e-5, warmup=2))
    c.feedback.update(temperature=0.8, max_new_tokens=48, batch_size=15, rendering="chat")
    c.pm.pmp.update(num_steps=6, max_pairs_per_question=2, optim=base.optim(2e-5, warmup=1))
    c.pm.update(num_steps=10, batch_size=4, seq_len=192, eval_fraction=0.3, optim=base.optim(5e-5, warmup=1))
    c.ppo.update(
        num_iterations=6,
        rollout_batch_size=8,
        minibatch_size=4,
        micro_batch_size=4,
        ppo_epochs=1,
        max_new_tokens=40,
        temperature=0.8,
        sample_every=2,
        optim=base.optim(2e-6),
    )
    c.eval.update(num_prompts=8, max_new_tokens=48, temperature=0.7, elo_snapshots=(0, 3, -1), n_bootstrap=100)
    return c
