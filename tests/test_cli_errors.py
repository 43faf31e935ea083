"""Every `deem` verb turns a user error (missing file, bad key, bad value, missing data, unreadable config, a
checkpoint directory that is not one) into one line `deem VERB: error: ...` on stderr and exit status 2; the
traceback only with `--debug`. Programming errors keep their traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import deem.cli
from deem.cli import error_line, main

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = str(REPO / "configs/train/tiny_pretrain.yaml")
EVAL_CONFIG = str(REPO / "configs/eval/synth.yaml")
DATA_CONFIG = str(REPO / "configs/data/synth.yaml")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A minimal shapes world: its tokenizer is what `deem eval` loads before the checkpoint."""
    from deem.data.synth import synth_world

    root = tmp_path_factory.mktemp("world")
    synth_world(root, num_train=1, num_test=1, image_size=16, num_laion_shards=1, laion_per_shard=1,
                num_mmc4_shards=1, docs_per_shard=1)
    return root


def _bad_yaml(tmp: Path) -> str:
    path = tmp / "broken.yaml"
    path.write_text("output_dir: run\noptim: lr: 1e-4\nrun: {}\n")
    return str(path)


def _run_without_checkpoint(tmp: Path) -> str:
    run = tmp / "run"
    run.mkdir()
    (run / "train_config.yaml").write_text(yaml.safe_dump({"output_dir": str(run), "data": {"dataset": "sft_vqa"}}))
    return str(run)


def _config_without_weights(tmp: Path) -> str:
    from deem.models import tiny

    ckpt = tmp / "ckpt"
    tiny().save_pretrained(ckpt)  # config.json only: no model.safetensors
    return str(ckpt)


# (verb, argv builder (tmp dir, world) -> argv, words the one line must contain)
CASES = {
    "info-unknown-config": ("info", lambda t, w: ["info", "--config", "no_such_preset"],
                            ["unknown config 'no_such_preset'", "deem_7b"]),
    "info-unknown-stage": ("info", lambda t, w: ["info", "--config", "tiny", "--stage", "warmup"],
                           ["unknown stage 'warmup'", "sft_vqa"]),
    "info-not-a-model-dir": ("info", lambda t, w: ["info", "--config", str(t)],
                             ["{t} is not a saved deem model", "no config.json"]),
    "data-synth-bad-value": ("data synth", lambda t, w: ["data", "synth", str(t / "w"), "--image-size", "0"],
                             ["image_size >= 8", "got image_size 0"]),
    "data-inspect-missing-config": ("data inspect", lambda t, w: ["data", "inspect", str(t / "missing.yaml")],
                                    ["{t}/missing.yaml", "does not exist"]),
    "data-inspect-missing-root": ("data inspect", lambda t, w: ["data", "inspect", DATA_CONFIG, "--root",
                                                                str(t / "no_root")],
                                  ["{t}/no_root", "does not exist"]),
    "data-robustvqa-missing-file": ("data robustvqa",
                                    lambda t, w: ["data", "robustvqa", "--imagenet-a", str(t), "--class-index",
                                                  str(t / "index.json"), "--clip", str(t), "--out", str(t / "o.json")],
                                    ["{t}/index.json", "class index"]),
    "train-missing-config": ("train", lambda t, w: ["train", str(t / "nope.yaml")],
                             ["{t}/nope.yaml", "no such training config"]),
    "train-unknown-key": ("train", lambda t, w: ["train", TRAIN_CONFIG, "optim.lrr=1"],
                          ["tiny_pretrain.yaml", "optim: unknown keys ['lrr']"]),
    "train-bad-value": ("train", lambda t, w: ["train", TRAIN_CONFIG, "optim.lr=fast"],
                        ["optim.lr: expected a number, got 'fast'"]),
    "train-unreadable-config": ("train", lambda t, w: ["train", _bad_yaml(t)],
                                ["{t}/broken.yaml", "not valid YAML", "line 2, column 10"]),
    "train-missing-data-config": ("train", lambda t, w: ["train", TRAIN_CONFIG, f"output_dir={t / 'run'}",
                                                         f"data.config={t / 'data.yaml'}"],
                                  ["data.config", "{t}/data.yaml", "does not exist"]),
    "train-missing-data": ("train", lambda t, w: ["train", TRAIN_CONFIG, f"output_dir={t / 'run'}",
                                                  f"data.root={t / 'no_data'}"],
                           ["{t}/no_data/tokenizer", "does not exist"]),
    "export-not-a-run": ("export-weights", lambda t, w: ["export-weights", str(t), str(t / "out")],
                         ["{t} is not a training run directory", "train_config.yaml"]),
    "export-no-checkpoint": ("export-weights", lambda t, w: ["export-weights", _run_without_checkpoint(t),
                                                             str(t / "out")],
                             ["{t}/run/checkpoints", "no checkpoint to export"]),
    "eval-missing-checkpoint": ("eval", lambda t, w: ["eval", EVAL_CONFIG, "--checkpoint", str(t / "ckpt"),
                                                      "--root", str(w), "--out", str(t / "out")],
                                ["{t}/ckpt", "not a deem checkpoint directory"]),
    "eval-checkpoint-without-weights": ("eval", lambda t, w: ["eval", EVAL_CONFIG, "--checkpoint",
                                                              _config_without_weights(t), "--root", str(w),
                                                              "--out", str(t / "out")],
                                        ["{t}/ckpt", "not a loadable deem checkpoint", "model.safetensors"]),
    "eval-unknown-benchmark": ("eval", lambda t, w: ["eval", EVAL_CONFIG, "--checkpoint", str(t), "--root", str(w),
                                                     "--out", str(t / "out"), "--benchmarks", "imagenet"],
                               ["no benchmark ['imagenet']", "vqav2_val"]),
    "eval-missing-option": ("eval", lambda t, w: ["eval", EVAL_CONFIG], ["--checkpoint is required"]),
    "demo-bad-value": ("demo", lambda t, w: ["demo", "--out", str(t / "demo"), "--steps-scale", "0"],
                       ["--steps-scale must be > 0"]),
}


def _call(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    status = main(argv)
    return status, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_user_error_is_one_line_and_status_2(case, tmp_path, world, capsys):
    verb, argv, words = CASES[case]
    status, err = _call(argv(tmp_path, world), capsys)
    assert status == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"deem {verb}: error: "), err
    for word in words:
        assert word.format(t=tmp_path) in lines[0], (word, lines[0])


@pytest.mark.parametrize("case", ["info-unknown-config", "data-inspect-missing-root", "train-missing-data-config",
                                  "export-no-checkpoint", "eval-missing-checkpoint", "demo-bad-value",
                                  "data-synth-bad-value", "data-robustvqa-missing-file"])
def test_debug_adds_the_traceback(case, tmp_path, world, capsys):
    verb, argv, _ = CASES[case]
    status, err = _call(["--debug", *argv(tmp_path, world)], capsys)
    assert status == 2
    assert "Traceback (most recent call last)" in err, err
    assert err.splitlines()[-1].startswith(f"deem {verb}: error: "), err


def test_debug_is_also_accepted_after_the_verb(tmp_path, capsys):
    status, err = _call(["train", str(tmp_path / "nope.yaml"), "--debug"], capsys)
    assert status == 2 and "Traceback (most recent call last)" in err and "ConfigError" in err, err


@pytest.mark.parametrize("bug", [TypeError("unsupported operand"), AssertionError("invariant"), KeyError("k"),
                                 ValueError("a plain ValueError is ours, not the user's")])
def test_a_programming_error_keeps_its_traceback(bug, monkeypatch, capsys):
    def broken(args):
        raise bug

    monkeypatch.setattr(deem.cli, "_cmd_info", broken)
    with pytest.raises(type(bug)):
        main(["info"])
    assert "error:" not in capsys.readouterr().err


def test_error_line_of_file_system_errors_and_worker_errors():
    from torch.utils.data import DataLoader, Dataset

    from deem.data import DataError

    assert error_line(FileNotFoundError(2, "No such file or directory", "/data/x.json")) == \
        "/data/x.json: no such file or directory"
    assert error_line(DataError("two\n  lines")) == "two lines"

    class Broken(Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int):
            raise DataError("shard /data/a.tar: truncated")

    with pytest.raises(DataError) as caught:  # re-raised in the main process, the worker's traceback inside
        next(iter(DataLoader(Broken(), num_workers=1, multiprocessing_context="fork")))
    assert "Traceback" in str(caught.value)
    assert error_line(caught.value) == "shard /data/a.tar: truncated"


def _deem_script() -> str:
    beside = Path(sys.executable).parent / "deem"
    found = str(beside) if beside.is_file() else shutil.which("deem")
    assert found, f"the `deem` console script is not installed beside {sys.executable} nor on PATH"
    return found


def test_the_installed_command_exits_with_status_2(tmp_path):
    proc = subprocess.run([_deem_script(), "train", str(tmp_path / "nope.yaml")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"deem train: error: {tmp_path / 'nope.yaml'}: no such training config"]
