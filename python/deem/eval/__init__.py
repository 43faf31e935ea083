"""DEEM evaluation: the standard metrics of every benchmark of the paper and the `deem eval` engine.

Entry points: `evaluate(config, checkpoint, out_dir)`, `load_eval_config`, the benchmark kinds in
`deem.eval.tasks` (`TASKS`), the metric functions in `deem.eval.metrics`, `build_robustvqa` (the RobustVQA test
file from ImageNet-A/-R/-V2), and the CLI hooks `add_eval_commands` / `add_robustvqa_command` in `deem.eval.cli`.
"""

from deem.eval.config import EvalConfig, load_eval_config
from deem.eval.engine import evaluate
from deem.eval.errors import EvalError
from deem.eval.report import results_table
from deem.eval.robustvqa import build_robustvqa
from deem.eval.tasks import TASKS

__all__ = ["TASKS", "EvalConfig", "EvalError", "build_robustvqa", "evaluate", "load_eval_config", "results_table"]
