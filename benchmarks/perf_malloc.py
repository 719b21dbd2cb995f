"""Page faults of a train step under glibc's malloc defaults vs the tunables of cai_jax/runtime.py.

    CAI_JAX_MALLOC=0 python benchmarks/perf_malloc.py    # glibc defaults
    python benchmarks/perf_malloc.py                     # re-executes itself with the tunables

A loop of jitted PM gradients (SmolLM2-135M-Instruct, bf16 matmuls, 8 pairs x 256 tokens, i.e.
16 x 256 tokens through the backbone); prints seconds, kernel (sys) seconds and minor page faults
per step, after a compile step.
"""

import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":
    from cai_jax.runtime import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()

import os  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.bench_train import _batches  # noqa: E402
from cai_jax.losses import pm_loss  # noqa: E402
from cai_jax.models import ScalarModel, load_pretrained  # noqa: E402
from cai_jax.train.pm import scalar_model_params  # noqa: E402
from cai_jax.train.steps import pm_scores  # noqa: E402


def main(steps: int = 2):
    lm = load_pretrained("smollm2-135m-instruct", with_tokenizer=False, dtype="bfloat16")
    _, batch = _batches(lm.config.vocab_size, 8, 256)
    batch = jax.tree.map(jnp.asarray, batch)
    model = ScalarModel(lm.config)
    params = scalar_model_params(lm.params, lm.config, seed=1)

    def loss_fn(p, b):
        r_a, r_b = pm_scores(p, b, model=model)
        return pm_loss(r_a, r_b, b["p"], 0.0)[0]

    grad = jax.jit(jax.grad(loss_fn))
    jax.block_until_ready(grad(params, batch))
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(grad(params, batch))
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    print(
        f"PM gradient: {(t1 - t0) / steps:.2f} s/step, kernel {(r1.ru_stime - r0.ru_stime) / steps:.2f} s/step, "
        f"{(r1.ru_minflt - r0.ru_minflt) / steps / 1e6:.2f} M minor faults/step"
    )


if __name__ == "__main__":
    main()
