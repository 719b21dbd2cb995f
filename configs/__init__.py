"""Run configs: `get_config(arg=None) -> ml_collections.ConfigDict` files, loaded by path by the launcher
(`--config configs/demo.py[:arg]`) and importable as a package (`from configs import base`).

base.py holds every knob with its default and unit; demo.py, tiny.py and llama8b_gpu8.py start from
it; ablate_*.py define a `sweep()` over one knob and start from demo, base or tiny (`:arg`).
"""
