"""`deem demo`: the paper's experiment at tiny scale, end to end (see deem.demo.run)."""

from deem.demo.plan import DemoPlan
from deem.demo.run import run_demo

__all__ = ["DemoPlan", "run_demo"]
