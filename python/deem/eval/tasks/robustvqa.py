"""RobustVQA (ImageNet-A/-R/-V2 as "Is {label} the main object in this image?"): POPE's yes/no records and
metrics, one benchmark per subset (group them for the mean). The test file is built by `deem.eval.robustvqa`."""

from __future__ import annotations

from deem.eval.tasks import pope
from deem.eval.tasks.base import Task

TASK = Task("robustvqa", ("generate_yesno",), pope.record, pope.score, ("accuracy", "yes_ratio"),
            dataset_types=("robustvqa",))
