"""Loads a sibling config file by name (config files are run by path, not imported as a package)."""

import importlib.util
import os


def load(name: str):
    """The module configs/<name>.py."""
    spec = importlib.util.spec_from_file_location(f"_cai_{name}", os.path.join(os.path.dirname(__file__), f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start(arg):
    """The config an ablation starts from: `demo` (default) or `base`, named by the macro argument."""
    name = arg or "demo"
    if name not in ("demo", "base", "tiny"):
        raise ValueError(f"ablation configs start from demo, base or tiny; got {name!r}")
    return load(name).get_config()
