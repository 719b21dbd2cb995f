"""Which dots of a compiled function run in YNNPACK fusions and which fall back to XLA/Eigen.

    python benchmarks/perf_hlo_dots.py [mlp|block|matmul] [--opt KEY=VALUE ...]

Prints, per compile-option set, each dot of the optimized HLO with its shapes and contracting
dims and whether it sits inside a `__ynn_fusion` (or `__xnn_fusion`) computation.
Options are XLA DebugOptions fields passed per compile (`compiler_options`), e.g.
`xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT`.
"""

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def dots_report(text):
    comps, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if m and not line.startswith(" "):
            cur = m.group(1)
            comps[cur] = []
        elif cur:
            comps[cur].append(line)
    lib = set()
    for line in text.splitlines():
        m = re.search(r"calls=%([\w.\-]+).*\"kind\":\"(__\w+_fusion)\"", line)
        if m:
            lib.add((m.group(1), m.group(2)))
    libmap = dict(lib)
    rows = []
    for name, lines in comps.items():
        for ln in lines:
            if " dot(" in ln:
                m = re.search(
                    r"= (\S+) dot\(([^)]*)\), (lhs_batch_dims=\{[^}]*\}, )?lhs_contracting_dims=\{([^}]*)\}, (rhs_batch_dims=\{[^}]*\}, )?rhs_contracting_dims=\{([^}]*)\}",
                    ln,
                )
                if m:
                    ops = re.findall(r"%([\w.\-]+)", m.group(2))
                    types = [re.search(r"%" + re.escape(o) + r" = (\w+)\[", "\\n".join(lines)) for o in ops]
                    types = "x".join(t.group(1) if t else "?" for t in types)
                    rows.append(
                        (
                            libmap.get(name, "xla/eigen"),
                            types,
                            m.group(1),
                            m.group(4),
                            m.group(6),
                            (m.group(3) or "").strip(", "),
                        )
                    )
    return rows


def main():
    from cai_jax.models import load_pretrained
    from cai_jax.nn.llama import MLP, Block

    what = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "mlp"
    opts = [a.split("=", 1) for a in sys.argv[2:] if "=" in a]
    dtype = next((a.split("=", 1)[1] for a in sys.argv[2:] if a.startswith("dtype=")), "float32")
    opts = [o for o in opts if o[0] != "dtype"]
    lm = load_pretrained("smollm2-135m-instruct", with_tokenizer=False, dtype=dtype)
    cfg = lm.config
    b, length = 4, 256
    x = jnp.ones((b, length, cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(length), (b, length))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (b, length, length))
    p0 = lm.params["layers_0"]
    if what == "mlp":
        f = lambda p, x: MLP(cfg).apply({"params": p}, x).sum()  # noqa: E731
        args = (p0["mlp"], x)
    else:
        f = lambda p, x: Block(cfg).apply({"params": p}, x, pos, mask)[0].sum()  # noqa: E731
        args = (p0, x)
    g = jax.jit(jax.grad(f, argnums=(0, 1)))
    for o in [None] + [{k: v} for k, v in opts]:
        text = g.lower(*args).compile(compiler_options=o).as_text()
        print(f"== options {o}: transposes={text.count(' transpose(')} copies={text.count(' copy(')}")
        for r in dots_report(text):
            print("  ", r)


if __name__ == "__main__":
    main()
