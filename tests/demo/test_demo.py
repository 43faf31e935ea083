"""`deem demo --quick` runs the whole pipeline and writes the report, the metrics and the plots."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_writes_report_and_metrics(tmp_path):
    out = tmp_path / "demo"
    subprocess.run([sys.executable, "-m", "deem", "demo", "--quick", "--out", str(out)], check=True,
                   capture_output=True, text=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["variants"]) == {"DEEM", "MM-Interleaved baseline"}
    for variant in metrics["variants"].values():
        summary = variant["summary"]
        assert summary["VQA accuracy (in distribution)"] is not None
        assert summary["VQA accuracy (style-shifted)"] is not None
        assert summary["RobustVQA-style accuracy (style-shifted, mean)"] is not None
        assert summary["caption CIDEr"] is not None
        assert 0 <= summary["generated images: caption's colour dominant"] <= 100
        assert variant["vqa_by_type"] and variant["probes"]
    assert 0 <= metrics["chance"]["vqa"] <= 100 and metrics["chance"]["caption"] > 0
    report = (out / "report.md").read_text()
    assert "| VQA accuracy (in distribution) |" in report and "chance" in report
    for png in ("losses.png", "samples.png", "generated.png"):
        assert (out / png).stat().st_size > 1000
    for run in ("components", "deem_stage1", "deem_stage2_vqa", "baseline_stage1", "baseline_stage2_vqa"):
        assert (out / "runs" / run / "log.jsonl").exists()
    stage1 = [json.loads(x) for x in (out / "runs/deem_stage1/log.jsonl").read_text().splitlines()]
    base1 = [json.loads(x) for x in (out / "runs/baseline_stage1/log.jsonl").read_text().splitlines()]
    assert all(r.get("loss_feedback") is not None for r in stage1)  # DEEM trains with the diffusion feedback
    assert all(r.get("loss_feedback") is None for r in base1)  # the baseline does not


def test_demo_without_java_fails_before_training(tmp_path, monkeypatch):
    import shutil

    from deem.demo import run_demo
    from deem.eval.caption_metrics import CaptionMetricError

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(CaptionMetricError, match="Java"):
        run_demo(tmp_path / "demo")
    assert not (tmp_path / "demo").exists()
