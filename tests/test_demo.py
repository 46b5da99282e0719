"""`qformer demo` end to end at smoke scale (tiny budgets: the numbers mean nothing, the files do)."""

import json
from pathlib import Path

import pytest

from qformer.cli import main


def test_the_world_tokenizer_knows_every_word_of_the_world(tmp_path):
    from qformer.bert_init import load_tokenizer
    from qformer.demo import world_tokenizer_for_qformer
    from qformer.world.shapes import generate_world

    generate_world(tmp_path / "data", n_train=50, n_test=10, n_compositional=5, seed=0)
    tok = load_tokenizer(world_tokenizer_for_qformer(tmp_path / "data", tmp_path / "tok"))
    records = json.loads((tmp_path / "data" / "test.json").read_text())
    for text in [c for r in records for c in r["caption"]] + [qa["question"] for r in records for qa in r["qa"]]:
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids, text
        assert ids[0] == tok.cls_token_id
    assert tok.bos_token == "[DEC]"


@pytest.mark.slow
def test_demo_writes_metrics_report_and_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("QFORMER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--fast"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for scores in (metrics["retrieval"]["itc"], metrics["retrieval"]["itm"]):
        assert {"i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"} <= set(scores)
    assert {"bleu4", "cider", "exact_match"} <= set(metrics["caption"])
    assert 0 <= metrics["vqa"]["accuracy"] <= 1
    assert "cider" in metrics["ablation"]["without_stage1"]["caption"]
    assert {"data", "backbones", "stage 1", "stage 2", "evaluation", "total"} <= set(metrics["seconds"])
    for d in ("data", "stage1/model", "stage2/model"):
        assert (out / d).is_dir()
    html = Path(out / "report.html").read_text()
    assert "<svg" in html and "query 0" in html
