"""Configs shipped with the package: the synthetic world (used by `deem demo` and the tests)."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
SYNTH_DATA = CONFIG_DIR / "synth_data.yaml"
SYNTH_EVAL = CONFIG_DIR / "synth_eval.yaml"
