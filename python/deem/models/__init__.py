"""DEEM model components."""

from deem.models.mmfs import MMFS

__all__ = ["MMFS"]
