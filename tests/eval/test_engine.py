"""`deem eval` end to end on the synthetic world with a tiny checkpoint: every reader and metric kind, the three
outputs, resumption (rerun and crash), multi-rank sharding and exact de-duplication, run fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deem.eval import EvalError, evaluate, load_eval_config
from deem.eval.io import PartWriter, part_files, read_parts
from tests.eval.conftest import all_benchmarks, eval_config

EXPECTED_KEYS = {
    "caption": {"CIDEr", "BLEU_4", "METEOR", "ROUGE_L"},
    "vqa": {"accuracy"},
    "vizwiz": {"accuracy", "accuracy_unanswerable", "accuracy_other"},
    "gqa": {"accuracy"},
    "pope": {"accuracy", "precision", "recall", "f1", "yes_ratio"},
    "robustvqa": {"accuracy", "yes_ratio"},
    "mmvp": {"accuracy", "pair_accuracy", "num_pairs"},
    "visdial": {"ndcg", "mrr", "r@1", "r@5", "r@10", "mean_rank"},
    "grounding": {"accuracy", "mean_iou", "parse_failure_rate"},
    "referring": {"CIDEr", "METEOR"},
}


class Counter:
    """progress callback: counts samples run per benchmark; can raise after N batches (a simulated crash)."""

    def __init__(self, crash_after: int | None = None):
        self.batches: dict[str, int] = {}
        self.samples: dict[str, int] = {}
        self.crash_after = crash_after

    def __call__(self, bench: str, done: int, total: int) -> None:
        self.batches[bench] = self.batches.get(bench, 0) + 1
        self.samples[bench] = done
        if self.crash_after is not None and sum(self.batches.values()) >= self.crash_after:
            raise KeyboardInterrupt("simulated crash")


@pytest.fixture(scope="module")
def full_run(world, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_full")
    counter = Counter()
    scored = evaluate(eval_config(world), checkpoint, out, progress=counter)
    return out, scored, counter


def _predictions(out: Path, name: str) -> list[dict]:
    return json.loads((out / name / "predictions.json").read_text())


def test_every_benchmark_writes_all_outputs(full_run, world):
    out, scored, counter = full_run
    names = [b["name"] for b in all_benchmarks()]
    assert sorted(scored) == sorted(names)
    cfg = load_eval_config(eval_config(world))
    ids = {}
    for bench in cfg.benchmarks:
        m = scored[bench.name]
        assert EXPECTED_KEYS[bench.kind.name] <= set(m), (bench.name, sorted(m))
        assert m["num_missing"] == 0 and m["num_failed"] == 0
        assert m["num_samples"] == m["num_expected"] > 0
        preds = _predictions(out, bench.name)
        assert len(preds) == m["num_samples"] == len({p["id"] for p in preds})
        assert json.loads((out / bench.name / "metrics.json").read_text())["num_samples"] == m["num_samples"]
        assert not (out / bench.name / "parts").exists()  # merged and removed
        ids[bench.name] = [p["id"] for p in preds]
        for key, value in m.items():
            if key not in ("kind",):
                assert isinstance(value, (int, float)) and value == value, (bench.name, key, value)
        # every sample was run exactly once
        assert counter.samples[bench.name] == m["num_samples"]
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["benchmarks"]) == set(names)
    group = summary["groups"]["robustvqa"]
    mean = sum(scored[f"robustvqa_{s}"]["accuracy"] for s in ("a", "r", "v2")) / 3
    assert group["accuracy"] == pytest.approx(mean)
    table = (out / "results.md").read_text()
    for name in [*names, "robustvqa"]:
        assert f"| {name} |" in table
    # records carry what the metrics need
    assert {"prediction", "references"} <= set(_predictions(out, "coco_caption")[0])
    assert len(_predictions(out, "coco_caption")[0]["references"]) == 2  # all references kept
    vd = _predictions(out, "visdial")[0]
    assert len(vd["scores"]) == len(vd["relevance"]) == 6 and vd["gt_index"] is not None
    assert {"box", "gt_box", "iou"} <= set(_predictions(out, "refcoco_val")[0])
    assert _predictions(out, "vizwiz")[0]["answer_type"] == "unanswerable"
    assert all(p["prediction"] in ("yes", "no") for p in _predictions(out, "pope_random"))


def test_predictions_are_in_dataset_order(full_run, world):
    out, _, _ = full_run
    qs = json.loads((world / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    assert [p["id"] for p in _predictions(out, "vqav2")] == [str(q["question_id"]) for q in qs]


def test_rerun_skips_done_samples(full_run, world, checkpoint):
    out, scored, _ = full_run
    before = (out / "vqav2" / "predictions.json").read_text()
    counter = Counter()
    again = evaluate(eval_config(world, ["vqav2", "pope_random", "mmvp"]), checkpoint, out, progress=counter)
    assert counter.batches == {}  # nothing ran again
    assert (out / "vqav2" / "predictions.json").read_text() == before
    for name in again:
        assert again[name] == scored[name]
    # the summary keeps the benchmarks of the earlier run
    assert set(json.loads((out / "metrics.json").read_text())["benchmarks"]) == set(scored)


def test_crash_leaves_valid_parts_and_resumes(world, checkpoint, tmp_path, full_run):
    names = ["vqav2", "pope_random"]
    cfg = eval_config(world, names, save_every=2)
    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, checkpoint, out, progress=Counter(crash_after=3))
    # batches 1-2 flushed by save_every, batch 3 by the exception's clean-up; each part atomic; nothing merged
    records, failed, files = read_parts(out / "vqav2" / "parts")
    assert len(files) == 2 and len(records) == 9 and not failed
    assert not (out / "vqav2" / "predictions.json").exists()
    assert all(not p.name.endswith(".tmp") for p in (out / "vqav2" / "parts").iterdir())
    # a write cut short by a hard kill leaves only a temporary file, which is ignored
    (out / "vqav2" / "parts" / ".rank00000-000002.json.k3j2.tmp").write_text('{"records": [{"id": ')
    counter = Counter()
    scored = evaluate(cfg, checkpoint, out, progress=counter)
    total = scored["vqav2"]["num_expected"]
    assert counter.samples["vqav2"] == total - 9  # only the remaining samples ran
    # identical to the uninterrupted run (greedy decoding is deterministic)
    full_out = full_run[0]
    for name in names:
        assert _predictions(out, name) == _predictions(full_out, name)
        assert scored[name] == full_run[1][name]


def test_shards_merge_exactly_by_id(world, checkpoint, tmp_path, full_run):
    names = ["vqav2", "refcoco_val"]
    cfg = eval_config(world, names)
    out = tmp_path / "sharded"
    assert evaluate(cfg, checkpoint, out, rank=1, world_size=3) == {}  # non-zero ranks only write parts
    assert evaluate(cfg, checkpoint, out, rank=2, world_size=3) == {}
    ranks = {p.name[:9] for p in part_files(out / "vqav2" / "parts")}
    assert ranks == {"rank00001", "rank00002"}
    scored = evaluate(cfg, checkpoint, out, rank=0, world_size=3)
    for name in names:
        assert scored[name]["num_missing"] == 0
        assert _predictions(out, name) == _predictions(full_run[0], name)


def test_duplicate_and_conflicting_records_are_merged_by_id(world, checkpoint, tmp_path, caplog):
    cfg = eval_config(world, ["pope_random"])
    out = tmp_path / "dups"
    scored = evaluate(cfg, checkpoint, out)
    preds = _predictions(out, "pope_random")
    # a stale part predicting two known ids again (one with another answer) and an unknown id
    w = PartWriter(out / "pope_random" / "parts", rank=7)
    w.add([dict(preds[0]), {**preds[1], "generation": "no", "prediction": "no"}, {**preds[2], "id": "nope"}])
    w.flush()
    again = evaluate(cfg, checkpoint, out, score_only=True)
    assert _predictions(out, "pope_random") == preds  # first record of an id wins, unknown ids dropped
    assert again["pope_random"] == scored["pope_random"]
    assert "predicted more than once" in caplog.text and "not in the dataset" in caplog.text


def test_changed_settings_are_refused_unless_overwrite(world, checkpoint, tmp_path):
    cfg = eval_config(world, ["gqa"])
    out = tmp_path / "fp"
    evaluate(cfg, checkpoint, out)
    cfg["benchmarks"][0]["generation"] = {**cfg["benchmarks"][0]["generation"], "max_new_tokens": 5}
    with pytest.raises(EvalError, match=r"another run.*generation"):
        evaluate(cfg, checkpoint, out)
    counter = Counter()
    evaluate(cfg, checkpoint, out, overwrite=True, progress=counter)
    assert counter.samples["gqa"] == 4


def test_failed_samples_are_reported_and_retried(world, checkpoint, tmp_path):
    cfg = eval_config(world, ["gqa"])
    cfg["benchmarks"][0]["dataset"]["max_bad_fraction"] = 1.0
    img = world / "gqa/images/n1.jpg"
    saved = img.read_bytes()
    img.write_bytes(b"not a jpeg")
    try:
        scored = evaluate(cfg, checkpoint, tmp_path / "bad")
    finally:
        img.write_bytes(saved)
    m = scored["gqa"]
    assert (m["num_samples"], m["num_missing"], m["num_failed"]) == (3, 1, 1)
    counter = Counter()
    scored = evaluate(cfg, checkpoint, tmp_path / "bad", progress=counter)
    assert counter.samples["gqa"] == 1 and scored["gqa"]["num_missing"] == 0


def test_config_errors_name_the_problem(world, checkpoint, tmp_path):
    cfg = eval_config(world, ["gqa"])
    with pytest.raises(EvalError, match="unknown keys"):
        load_eval_config({**cfg, "batchsize": 3})
    bad = eval_config(world, ["gqa"])
    bad["benchmarks"][0]["generation"] = {"beams": 2}
    with pytest.raises(EvalError, match=r"'gqa'.*unknown generation setting 'beams'"):
        load_eval_config(bad)
    with pytest.raises(EvalError, match="no benchmark"):
        evaluate(cfg, checkpoint, tmp_path / "x", benchmarks=["nope"])
    wrong = eval_config(world, ["gqa"])
    wrong["benchmarks"][0]["metric"] = "visdial"
    with pytest.raises(EvalError, match="gqa: collator mode 'generate_vqa'"):
        evaluate(wrong, checkpoint, tmp_path / "y")
    res = eval_config(world, ["gqa"], resolution=64)
    with pytest.raises(EvalError, match="image encoder expects 32"):
        evaluate(res, checkpoint, tmp_path / "z")
    tok = eval_config(world, ["gqa"])
    tok["tokenizer"]["num_img_token"] = 5
    with pytest.raises(EvalError, match="num_img_token"):
        evaluate(tok, checkpoint, tmp_path / "w")


def test_shipped_configs_parse():
    root = Path(__file__).resolve().parents[2] / "configs" / "eval"
    kinds = set()
    for path in sorted(root.glob("*.yaml")):
        cfg = load_eval_config(path)
        kinds |= {b.kind.name for b in cfg.benchmarks}
    assert kinds == {"caption", "vqa", "vizwiz", "gqa", "pope", "robustvqa", "mmvp", "visdial", "grounding",
                     "referring"}
    vqa = load_eval_config(root / "vqa.yaml")
    gen = {b.name: b.generation for b in vqa.benchmarks}
    assert gen["vqav2"] == {"num_beams": 3, "max_new_tokens": 10, "min_new_tokens": 0, "length_penalty": 0.0}
    cap = {b.name: b.generation for b in load_eval_config(root / "caption.yaml").benchmarks}
    assert cap["coco_caption"]["num_beams"] == 5 and cap["coco_caption"]["max_new_tokens"] == 20


class OracleModel(torch.nn.Module):
    """Stands in for DeemModel: answers the queued ground truths in dataset order (one rank runs samples in
    order), so every metric's wiring must give its best score."""

    def __init__(self, checkpoint: Path, tok, answers: list[str]):
        super().__init__()
        from deem.models import DeemConfig

        self.config = DeemConfig.from_pretrained(str(checkpoint))
        self.tok, self.answers = tok, list(answers)

    def generate_texts(self, text_ids, attention_mask, image_tensors, num_image_per_seq, image_tensors_mask=None,
                       **gen):
        rows = [self.tok.encode(self.answers.pop(0), add_bos=False) for _ in range(text_ids.shape[0])]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.tok.special.pad_id] * (width - len(r)) for r in rows])


def test_oracle_answers_score_the_maximum(world, checkpoint, tmp_path):
    from deem.data import load_tokenizer

    tok = load_tokenizer({"type": "hf", "path": str(world / "tokenizer"), "num_img_token": 4})
    anns = json.loads((world / "vqav2/v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    pope = [json.loads(line)["label"] for line in (world / "pope/coco_pope_random.json").read_text().splitlines()]
    boxes = [r["bbox"] for r in json.loads((world / "refcoco/refcoco_val.json").read_text())]
    karpathy = json.loads((world / "coco/annotations/coco_karpathy_test.json").read_text())

    def box_text(b):  # 48-px images; the 0-999 grid of the spec's box format
        x, y, w, h = b
        return "".join(f"({round(u / 48 * 999):03d},{round(v / 48 * 999):03d})" for u, v in ((x, y), (x + w, y + h)))

    answers = {"vqav2": [a["multiple_choice_answer"] for a in anns], "pope_random": [f"{p}." for p in pope],
               "mmvp": ["(a)", "b", "a", "(b) No"], "gqa": ["yes"] * 4,
               "refcoco_val": [box_text(b) for b in boxes], "coco_caption": [k["caption"][1] for k in karpathy]}
    names = list(answers)
    model = OracleModel(checkpoint, tok, [a for n in names for a in answers[n]])
    cfg = eval_config(world, names, batch_size=4)
    cfg["benchmarks"].sort(key=lambda b: names.index(b["name"]))
    scored = evaluate(cfg, model, tmp_path / "oracle", tokenizer=tok)
    assert not model.answers  # every answer consumed, in order
    assert scored["vqav2"]["accuracy"] == pytest.approx(100.0)
    assert scored["pope_random"]["accuracy"] == scored["pope_random"]["f1"] == pytest.approx(100.0)
    assert scored["pope_random"]["yes_ratio"] == pytest.approx(50.0)
    assert scored["mmvp"]["accuracy"] == scored["mmvp"]["pair_accuracy"] == pytest.approx(100.0)
    assert scored["gqa"]["accuracy"] == pytest.approx(100.0)
    assert scored["refcoco_val"]["accuracy"] == pytest.approx(100.0)
    assert scored["refcoco_val"]["mean_iou"] > 90.0
    assert scored["coco_caption"]["BLEU_4"] == pytest.approx(100.0, abs=1e-6)  # equals one of the references
    assert model.training  # an in-memory model gets its mode back


@pytest.mark.slow
def test_torchrun_two_ranks_gather_through_the_process_group(world, checkpoint, tmp_path, full_run, torchrun):
    """Two processes under torchrun (gloo on CPU): ranks exchange their records with all_gather_object; rank 0
    merges and scores. The output matches the single-process run."""
    names = ["vqav2", "visdial"]
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(eval_config(world, names)))
    out = tmp_path / "dist"
    script = tmp_path / "run.py"
    script.write_text(
        "import json, os\n"
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from deem.eval import evaluate\n"
        f"scored = evaluate(json.load(open({str(cfg_path)!r})), {str(checkpoint)!r}, {str(out)!r})\n"
        "import torch.distributed as dist\n"
        "result = {'rank': dist.get_rank(), 'world_size': dist.get_world_size(), 'scored': sorted(scored)}\n"
        "with open(os.path.join(os.environ['DEEM_TEST_RESULTS'], f'rank{dist.get_rank()}.json'), 'w') as f:\n"
        "    json.dump(result, f)\n")
    proc = torchrun([str(script)], timeout=300)
    assert proc.returncode == 0, proc.report()
    assert proc.results == {0: {"rank": 0, "world_size": 2, "scored": ["visdial", "vqav2"]},
                            1: {"rank": 1, "world_size": 2, "scored": []}}, proc.report()
    for name in names:
        assert _predictions(out, name) == _predictions(full_run[0], name)
        assert json.loads((out / name / "metrics.json").read_text())["num_missing"] == 0
