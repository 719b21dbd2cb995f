"""What the ablation configs share: the config a sweep starts from, named by the macro argument."""

from configs import base, demo, tiny

STARTS = {"demo": demo, "base": base, "tiny": tiny}


def start(arg):
    """The config an ablation starts from: `demo` (default), `base` or `tiny`, named after the colon."""
    name = arg or "demo"
    if name not in STARTS:
        raise ValueError(f"ablation configs start from {', '.join(STARTS)}; got {name!r}")
    return STARTS[name].get_config()
