r"""Every knob of a Constitutional AI run, with its default and unit. Other configs start from this.

    python -m experiments.launch --config configs/base.py --workdir runs/base

The base is a full pipeline on the embedded SmolLM2-135M-Instruct with paper-like settings but
modest sizes; `demo.py` shrinks it to fit 30 minutes on 2 CPU cores, `tiny.py` to a random model
for tests, `llama8b_gpu8.py` grows it to a mesh. Stage order: revisions -> sft -> feedback -> pm
-> ppo -> eval -> report (docs/design.md). Override any field with `--config.<a>.<b>=<value>`.
"""

import ml_collections


def optim(lr: float, warmup: int = 0) -> ml_collections.ConfigDict:
    """An `optim` sub-dict (fields of cai_jax.train.state.OptimConfig)."""
    return ml_collections.ConfigDict(
        dict(
            lr=lr,  # peak learning rate per update
            warmup_steps=warmup,  # updates of linear warmup
            schedule="cosine",  # constant | cosine (after warmup)
            # updates; the cosine floor is reached here. 0 = where the stage's own updates end
            # (derived from its step counts); a positive value overrides that.
            total_steps=0,
            min_lr_ratio=0.1,  # cosine floor as a fraction of lr
            weight_decay=0.0,  # decoupled AdamW decay (matrices only)
            b1=0.9,  # Adam first-moment decay
            b2=0.95,  # Adam second-moment decay
            eps=1e-8,  # Adam epsilon
            grad_clip_norm=1.0,  # global gradient L2 clip; 0 disables
            grad_accum_steps=1,  # micro-batches per update
            frozen=(),  # regexes of "/"-joined param paths that get no update
        )
    )


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0  # one seed for every stage (each stage folds in its own constant)

    # ---------------------------------------------------------------- models
    c.model = dict(
        name="smollm2-135m-instruct",  # preset, HF-format folder, .gguf file or locally cached hub name
        init="pretrained",  # pretrained | random (random weights of `random_config`; tokenizer from `name`)
        random_config=dict(  # ModelConfig fields used when init=random (vocab comes from the tokenizer)
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            max_position_embeddings=2048,
        ),
        # Matmul input dtype; accumulation, activations' softmax, losses and AdamW stay fp32. "auto"
        # = bfloat16 on GPU / TPU and on CPUs with bf16 dot instructions (AVX512-BF16, AMX), else
        # float32; resolved when the config is loaded, so config.json and the hashes hold it.
        dtype="auto",
        param_dtype="float32",  # master weights
        # LoRA adapters (Hu et al. 2021) for SL-CAI and RL-CAI: rank 0 trains every weight. With
        # rank > 0, sft trains adapters on the starting model and exports it merged (plus the
        # adapters alone in PEFT's layout in sft/adapter); ppo / rloo put fresh adapters on the
        # SL-CAI model, which is stored once as the frozen base of the policy, the reference and
        # the value model. dpo / ipo refuse it. Read only by sft and ppo (and in their hashes).
        lora=dict(
            rank=0,
            alpha=16.0,  # the update is scaled by alpha / rank
            dropout=0.0,  # only 0 (the adapters are merged into the weights before each forward)
            target_modules=[  # regexes over "/"-joined param paths: q, k, v, o, gate, up, down
                r"self_attn/(q_proj|k_proj|v_proj|o_proj)/kernel$",
                r"mlp/(gate_proj|up_proj|down_proj)/kernel$",
            ],
        ),
    )
    # The feedback model answers the multiple-choice questions; the paper uses a pretrained LM, not
    # the policy. "" = the same checkpoint as model.name (before SL-CAI fine-tuning).
    c.feedback_model = dict(name="")
    c.constitution = ""  # "" = the project's default; or a schema file / the paper's prompts folder
    c.mesh = dict(data=-1, fsdp=1, tensor=1)  # devices per axis; -1 = all remaining
    c.checkpoint = dict(
        save_every_steps=50,  # optimizer steps (PPO: iterations) between saves; the end is always saved
        keep_last=2,  # most recent checkpoints kept while a stage runs
        keep_after_done=False,  # False: delete a stage's checkpoints once its exported artifact is written
        # True: a save copies the state to host memory and writes it in a background thread while
        # training goes on (a stage waits for it before it ends); False: the step waits for the
        # write. Off by default: on 2 CPU cores the write slowed the steps it overlapped by about
        # what it saved, and the host copies raised the demo's peak memory (BENCHMARKS.md).
        async_save=False,
    )

    # ---------------------------------------------------------------- data
    c.prompts = dict(
        red_team="shipped:red_team",  # shipped:red_team, a file/folder (jsonl, json, txt, parquet, csv, hh-rlhf)
        helpful="shipped:helpful",  # prompts for helpful samples and helpfulness evals
        num_red_team=64,  # first N after dedup/filter; 0 = all
        num_helpful=32,  # 0 = all
        eval_fraction=0.25,  # held-out share (hash of the text) used by feedback eval and evals
        max_chars=2000,  # longer prompts are dropped (counted)
    )

    # ---------------------------------------------------------------- 1. revisions (SL-CAI data)
    c.revisions = dict(
        num_prompts=0,  # first N training red-team prompts revised; 0 = all (feedback uses them all)
        num_revisions=4,  # critique -> revision rounds (paper: up to 4)
        num_principles=0,  # sample from the first k SL principles; 0 = all (paper ablation: 1..16)
        mode="critique",  # critique | direct (revise without a critique; paper Fig. 7)
        num_few_shots=0,  # constitution few-shot transcripts prepended
        temperature=1.0,  # paper: T = 1
        top_p=1.0,  # nucleus mass; 1 disables
        max_new_tokens=128,  # tokens per answer, critique or revision
        rendering="chat",  # chat (chat template) | transcript ("\n\nHuman:" framing for base models)
        batch_size=16,  # prompts per generate call and output shard
        helpful_max_new_tokens=128,  # tokens per helpful sample (mixed into SFT)
    )

    # ---------------------------------------------------------------- 2. sft (SL-CAI model)
    c.sft = dict(
        revision_round=-1,  # SL-CAI-n: revisions of rounds 1..n (0 = the initial answers); -1 = all rounds
        final_only=False,  # True: only the last round's revision per prompt
        helpful_ratio=0.5,  # helpful samples per harmlessness example
        rendering="chat",  # how (prompt, response) pairs are tokenized
        num_steps=100,  # optimizer updates
        batch_size=8,  # sequences per update (global)
        seq_len=256,  # tokens per sequence (pad/truncate, or pack)
        packing=False,  # pack several examples per row (segment-aware attention)
        optim=optim(1e-5, warmup=10),
    )

    # ---------------------------------------------------------------- 3. feedback (AI labels)
    c.feedback = dict(
        num_prompts=0,  # red-team prompts labelled; 0 = all training prompts
        # Also label pairs on the helpful prompts under the helpfulness questions (the PM's
        # helpfulness half when pm.helpful_source = "feedback").
        label_helpful=True,
        num_helpful_prompts=0,  # helpful prompts labelled; 0 = all training helpful prompts
        helpful_constitution="helpfulness",  # shipped name or file of the helpfulness questions
        label="soft",  # soft | hard | cot (chain of thought)
        cot_clamp="none",  # cot only: none | 20-80 | 40-60 (clamp of the answer probability)
        cot_samples=1,  # cot only: reasoning samples averaged
        cot_max_new_tokens=96,  # cot only: reasoning length
        ensemble=1,  # feedback principles per comparison (distinct ones), their probabilities averaged
        num_principles=0,  # sample from the first k feedback principles; 0 = all (as revisions.num_principles)
        swap=True,  # also score with A/B swapped and average (cancels position bias)
        swap_average="logit",  # logit (cancels a constant position bias exactly) | prob
        num_few_shots=0,  # constitution MC few-shots prepended
        rendering="transcript",  # transcript ("\n\nHuman:" framing, base models) | chat: how the judge sees the question
        temperature=1.0,  # policy sampling temperature for the two responses (paper: 1)
        top_p=1.0,
        max_new_tokens=96,  # per sampled response
        batch_size=16,  # prompts per batch and output shard
        scoring_batch_size=16,  # question+option sequences per judge call
        cot_temperature=1.0,  # cot only: reasoning sampling temperature
        # cot only: the reasoning ends at the first of these strings
        cot_stop_strings=("The answer is", "the answer is", "\n\nHuman:", "\n\nConsider the following"),
    )

    # ---------------------------------------------------------------- 4. pm (PMP + preference model)
    c.pm = dict(
        pmp=dict(
            enabled=True,  # preference-model pretraining before the PM fine-tune
            source="shipped",  # shipped (project-made sample) | StackExchange-style file/folder/hub name
            max_pairs_per_question=4,  # pairs kept per question
            num_steps=50,  # updates
            optim=optim(1e-5, warmup=5),
        ),
        # Helpfulness comparisons mixed into the PM's data (harmless but not evasive): "feedback" =
        # the feedback stage's AI labels on helpful prompts; or an hh-rlhf-style {chosen, rejected}
        # file (p = 1); "" = none (a PM of harmlessness only).
        helpful_source="feedback",
        # Share of helpfulness comparisons in the PM mix. The paper's PM data: 135,296 human
        # helpfulness and 182,831 AI harmlessness comparisons, a share of 0.43.
        helpful_fraction=0.4,
        centering=0.0,  # reward-centering coefficient (0 disables)
        num_steps=100,  # updates on the AI comparisons
        batch_size=8,  # pairs per update
        seq_len=320,  # tokens per prompt+response (prompt truncated from the left)
        rendering="chat",  # how the PM reads (prompt, response)
        eval_fraction=0.2,  # comparisons held out for accuracy / calibration
        optim=optim(1e-5, warmup=10),
    )

    # ---------------------------------------------------------------- 5. ppo (RL-CAI)
    c.ppo = dict(  # fields of cai_jax.train.ppo_steps.PPOConfig, plus num_iterations and optim
        num_iterations=20,  # PPO iterations (rollout batch + updates)
        rollout_batch_size=16,  # prompts (episodes, one response each) per iteration
        minibatch_size=8,  # episodes per optimizer update; divides rollout_batch_size
        micro_batch_size=4,  # rows per forward/backward pass (accumulated up to minibatch_size)
        ppo_epochs=2,  # passes over each rollout batch
        max_new_tokens=64,  # response length cap, tokens
        temperature=1.0,  # rollout sampling temperature (> 0)
        generation_batch_size=0,  # rows per sampler call; 0 = the whole rollout batch
        gamma=1.0,  # GAE discount per token
        lam=0.95,  # GAE lambda
        clip_ratio=0.2,  # policy probability-ratio clip epsilon
        clip_value=0.2,  # value clip, reward units
        vf_coef=0.1,  # value loss weight
        ent_coef=0.0,  # entropy bonus weight; 0 disables
        kl_coef=0.05,  # beta: KL penalty to the SL-CAI reference, reward units per nat
        kl_estimator="k1",  # per-token KL estimator: k1 | k3
        adaptive_kl=False,  # adapt beta toward kl_target (Ziegler et al. 2019)
        kl_target=6.0,  # nats per response, for the adaptive controller
        kl_horizon=10000,  # controller horizon, episodes
        missing_eos_penalty=1.0,  # subtracted from the normalised score of a response without EOS; 0 disables
        whiten_advantages=True,  # whiten advantages over each rollout batch
        value_init="pm",  # pm | policy: where the value network starts
        shared_backbone=False,  # value head on the policy's backbone (needs value_init=policy)
        pm_retokenize=True,  # PM with another vocabulary: re-encode the text (False: error)
        sample_every=5,  # iterations between sample dumps (ppo/samples.jsonl); 0 disables
        num_samples_logged=4,  # samples per dump
        optim=optim(1e-6, warmup=0),  # one optimizer for policy and value; a step = one minibatch
    )

    # ---------------------------------------------------------------- 5. the RL-CAI objective
    # The ppo stage optimises the SL-CAI policy with one of: ppo (section ppo above), rloo (k samples
    # per prompt, leave-one-out REINFORCE against the PM, no value model; section rloo) or dpo / ipo
    # (soft-label DPO / IPO on the feedback stage's comparisons, no PM in the loss; section dpo).
    # configs/ablate_rl.py runs all four from one SL-CAI model.
    c.rl = dict(algorithm="ppo")  # ppo | rloo | dpo | ipo
    c.rloo = dict(  # fields of cai_jax.train.rloo_steps.RLOOConfig, plus num_iterations and optim
        num_iterations=20,  # iterations (rollout batch + updates)
        rollout_batch_size=8,  # prompts per iteration
        k=4,  # samples per prompt (>= 2): each one's baseline is the mean reward of the other k - 1
        minibatch_size=32,  # rows (prompts x k) per update; = rollout_batch_size * k: one on-policy update
        micro_batch_size=4,  # rows per forward/backward pass
        epochs=1,  # passes over each rollout; > 1 reuses it off-policy (no clipping)
        max_new_tokens=64,  # as ppo
        temperature=1.0,
        generation_batch_size=0,  # rows per sampler call, a multiple of k; 0 = the whole batch
        kl_coef=0.05,  # beta, as ppo: reward units per nat
        kl_estimator="k1",
        missing_eos_penalty=1.0,
        pm_retokenize=True,
        sample_every=5,
        num_samples_logged=4,
        optim=optim(1e-6, warmup=0),
    )
    c.dpo = dict(  # dpo and ipo
        # beta: implied reward per nat of log(pi / ref). DPO: the soft target's temperature; IPO:
        # the target margin is (p - 1/2) / beta (Azar et al. 2023, tau = beta).
        beta=0.1,
        num_steps=100,  # optimizer updates
        batch_size=8,  # comparisons per update
        seq_len=320,  # tokens per (prompt, response) side, the prompt cut from the left (as pm.seq_len)
        helpful_fraction=0.4,  # share of helpfulness comparisons in the mix (as pm.helpful_fraction)
        eval_every=10,  # steps between PM-scored samples (ppo's sampling settings, ppo's metric names)
        optim=optim(1e-6, warmup=10),
    )

    # ---------------------------------------------------------------- 6. eval, figures, report
    c.eval = dict(
        # PM that scores responses in evals and figures: "" = this run's pm stage; or a pm/export
        # folder of another run (ablation sweeps over revision settings share one scorer).
        scorer_pm="",
        num_prompts=32,  # held-out red-team and helpful prompts each
        max_new_tokens=96,  # per evaluated response
        temperature=1.0,  # sampling temperature of evaluated responses (same keys for every model)
        revision_rounds=True,  # PM score of each revision round (Fig. 5)
        elo_snapshots=(0, -1),  # PPO steps compared (besides the helpful and SL-CAI models); -1 = last
        elo_comparisons=1,  # AI comparisons per prompt and model pair
        n_bootstrap=200,  # Elo confidence-interval resamples
        # Gaussian prior on Bradley-Terry log-strengths (natural-log units; 0.01 = std 10 nats,
        # ~4000 Elo): keeps scores finite when a model wins every comparison of a resample.
        elo_l2=0.01,
        mc_files=(),  # multiple-choice eval files in the paper's format (paths); () = none
        mc_max_questions=0,  # 0 = all questions of each file
        calibration_bins=10,  # reliability bins (Fig. 9)
    )
    c.log = dict(
        progress=True,  # progress bars
        tensorboard=True,  # TensorBoard event files (<workdir>/tensorboard) if a writer is installed
        # Weights & Biases, if the wandb package is installed: "offline" (<workdir>/wandb; upload
        # later with `wandb sync`), "online", or "" (off). experiments/wandb_log.py.
        wandb="offline",
    )
    return c
