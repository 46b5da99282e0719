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


def test_minutes_scale_fits_the_three_trainings_into_the_time_left():
    from qformer.demo import DemoPlan, minutes_scale

    plan = DemoPlan(stage1_steps=100, stage2_steps=50)
    # 2000 s left, 5% (100 s) kept for evaluation: 1900 s for 100 x 0.5 s + 2 x 50 x 0.3 s = 80 s of steps
    assert minutes_scale(2000.0, plan, 0.5, 0.3) == pytest.approx(1900 / 80)
    # at least 60 s is kept for evaluation (5% of 1000 s is 50), and the floor is 0.1
    assert minutes_scale(1000.0, plan, 0.5, 0.3) == pytest.approx(940 / 80)
    assert minutes_scale(100.0, plan, 0.5, 0.3) == pytest.approx(40 / 80)
    assert minutes_scale(30.0, plan, 0.5, 0.3) == 0.1
    # side by side: stage 1 (50 s) with the ablation (15 s) beside it, 1.8x slower while both run
    # (50 + 0.8 x 15 = 62 s), then stage 2 (15 s): 77 s
    assert minutes_scale(1000.0, plan, 0.5, 0.3, side_by_side=True) == pytest.approx(940 / 77)


def test_plan_scaled_keeps_a_floor_and_no_fine_tune():
    from qformer.demo import DemoPlan

    plan = DemoPlan(stage1_steps=600, stage2_steps=400, retrieval_steps=150).scaled(0.5)
    assert (plan.stage1_steps, plan.stage2_steps, plan.retrieval_steps) == (300, 200, 75)
    plan = DemoPlan(stage1_steps=600, stage2_steps=4, retrieval_steps=0).scaled(0.01)
    assert (plan.stage1_steps, plan.stage2_steps, plan.retrieval_steps) == (10, 4, 0)
    assert DemoPlan(stage1_steps=100).scaled(1.5).stage1_steps == 150


def test_backbone_budgets_are_the_reference_shares_of_the_minutes():
    from qformer.demo import BACKBONE_TIMES, backbone_budgets

    t = BACKBONE_TIMES["simple"]
    budgets = backbone_budgets("simple", t.total_s / 2)  # half the reference run: half of each
    assert budgets == pytest.approx({"vit": t.vit_s / 2, "lm": t.lm_s / 2, "bert": t.bert_s / 2})
    # 30 minutes of the full world, 1.12x its reference run: budgets a slower machine may reach
    full = BACKBONE_TIMES["full"]
    assert backbone_budgets("full", 1800.0)["vit"] == pytest.approx(full.vit_s * 1800.0 / full.total_s)


@pytest.mark.slow
def test_demo_minutes_budget_the_backbones_too(tmp_path, monkeypatch):
    import qformer.demo

    monkeypatch.setenv("QFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QFORMER_SIDE_BY_SIDE", "0")
    # as if the reference run had taken a million times longer: every backbone's budget runs out
    # before its second step
    t = qformer.demo.BACKBONE_TIMES["simple"]
    slow = qformer.demo.BackboneTimes(total_s=t.total_s * 1e6, vit_s=t.vit_s, lm_s=t.lm_s, bert_s=t.bert_s)
    monkeypatch.setitem(qformer.demo.BACKBONE_TIMES, "simple", slow)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--fast", "--minutes", "0.5"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["calibration"]["backbone_budgets_s"]["vit"] == pytest.approx(t.vit_s * 30 / slow.total_s, abs=0.1)
    cache = tmp_path / "cache"
    for pattern in ("vit-*/vit_train_info.txt", "llm-*/lm_train_info.txt", "bert-*/bert_train_info.txt"):
        info = json.loads(next(cache.glob(pattern)).read_text())
        assert info["steps_done"] < info["steps"] == 2, pattern  # the fast backbones' 2 steps


@pytest.mark.slow
def test_demo_writes_metrics_report_and_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("QFORMER_CACHE", str(tmp_path / "cache"))
    # as on a real --minutes run: the text models beside the ViT, the ablation beside stage 1, the
    # retrieval evaluation beside stage 2 (each in a second process)
    monkeypatch.setenv("QFORMER_SIDE_BY_SIDE", "1")
    out = tmp_path / "demo"
    # --minutes 0.5 leaves no time for training after the calibration: the floor of 10 steps
    assert main(["demo", "--out", str(out), "--fast", "--minutes", "0.5"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["calibration"]["stage1_s_per_step"] > 0 and metrics["calibration"]["stage2_s_per_step"] > 0
    # 0.1 of the fast plan's 4 steps: the floor of 10 steps, or the plan's own count if fewer
    assert metrics["calibration"]["scale"] == 0.1 and metrics["plan"]["stage1_steps"] == 4
    assert not (out / "calibration").exists()
    for scores in (metrics["retrieval"]["itc"], metrics["retrieval"]["itm"]):
        assert {"i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"} <= set(scores)
    assert {"bleu4", "cider", "exact_match"} <= set(metrics["caption"])
    assert metrics["caption"]["exact_match_by_objects"] == {"1": metrics["caption"]["exact_match"]}  # simple world
    assert 0 <= metrics["vqa"]["accuracy"] <= 1
    fresh = metrics["ablation"]["without_stage1"]  # the fresh arm is scored as stage 2 is
    assert {"bleu4", "cider", "exact_match"} <= set(fresh["caption"]) and 0 <= fresh["vqa"]["accuracy"] <= 1
    ceiling = metrics["llm_from_true_scene"]  # the frozen LM's own captions and answers from the true scene words
    assert 0 <= ceiling["caption_all_correct"] <= 1 and 0 <= ceiling["vqa_accuracy"] <= 1
    assert {"data", "backbones", "stage 1", "stage 2", "evaluation", "total"} <= set(metrics["seconds"])
    assert metrics["seconds"]["ablation: stage 2 without stage 1, and its evaluation (beside stage 1)"] > 0
    assert metrics["seconds"]["retrieval fine-tune and evaluation (beside stage 2 and the evaluation)"] > 0
    assert "stage 2:" in (out / "stage2_without_stage1.log").read_text()  # its progress bar went to its log
    for d in ("data", "stage1/model", "stage2/model", "stage2_without_stage1/model", "retrieval/model"):
        assert (out / d).is_dir()
    # retrieval is read from stage 1 fine-tuned as the re-ranker (ITM weighted, ITC off)
    assert metrics["retrieval"]["checkpoint"] == "retrieval/model"
    tuned = json.loads((out / "retrieval" / "model" / "config.json").read_text())
    assert tuned["options"]["loss_weights"] == {"itc": 0.0, "itm": 4.0, "itg": 1.0}
    html = Path(out / "report.html").read_text()
    assert "<svg" in html and "query 0" in html
    # the seconds come with what they were measured on
    import torch

    machine = metrics["machine"]
    assert machine["torch"] == torch.__version__ and machine["cores"] >= 1 and machine["cpu"]
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "<caption>machine</caption>" in html and f"<td class=\"txt\">{machine['cpu_capability']}</td>" in html


@pytest.mark.slow
def test_demo_one_job_after_the_other(tmp_path, monkeypatch):
    """QFORMER_SIDE_BY_SIDE=0: no side jobs; the ablation and the retrieval evaluation get their own
    phases and the metrics are the same set."""
    monkeypatch.setenv("QFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QFORMER_SIDE_BY_SIDE", "0")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--fast"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"ablation: stage 2 without stage 1, and its evaluation", "retrieval fine-tune and evaluation"} <= set(metrics["seconds"])
    assert not (out / "stage2_without_stage1.log").exists()
    assert {"i2t_r1", "t2i_r1"} <= set(metrics["retrieval"]["itm"]) and "compositional" in metrics


def test_demo_qformer_starts_its_fresh_layers_at_the_width_scaled_std(tmp_path):
    """Both stages (and the ablation's fresh arm) build the Q-Former with DemoSettings.INIT_STD:
    its cross-attention and queries start at that std, not at bert-base's 0.02."""
    import torch

    from qformer.config import QFormerConfig
    from qformer.demo import DemoPlan, DemoSettings, default_plan
    from qformer.stage1 import Stage1Model

    settings = DemoSettings(tmp_path, DemoPlan(), seed=0, llm_dir="", vision={}, tokenizer_dir=tmp_path,
                            stage2_data=tmp_path / "s2.json")  # fmt: skip
    assert settings.stage1(tmp_path / "s1", 10).qformer["initializer_range"] == DemoSettings.INIT_STD == 0.05
    assert settings.stage2(tmp_path / "s2", None, 10).qformer["initializer_range"] == 0.05
    # stage 1 sums its three losses as the original; the simple world's retrieval fine-tune goes on
    # from it with ITM weighted and ITC off; the full world reads retrieval from stage 1 itself
    assert settings.stage1(tmp_path / "s1", 10).loss_weights == {}
    tune = settings.retrieval(tmp_path / "r", str(tmp_path / "s1" / "model"), 150)
    assert tune.init_from == str(tmp_path / "s1" / "model") and tune.loss_weights == {"itc": 0.0, "itm": 4.0}
    assert tune.problems() == [] and tune.lr == 5e-4 and tune.max_steps == 150
    assert default_plan("simple").retrieval_steps == 150 and default_plan("full").retrieval_steps == 0
    torch.manual_seed(0)
    model = Stage1Model(QFormerConfig.from_name("tiny", vision_width=128, **settings.qformer))
    cross = torch.cat([layer.cross_attn.k.weight.flatten() for layer in model.qformer.layers])
    assert abs(cross.std().item() - 0.05) < 0.002
    assert abs(model.qformer.query_tokens.std().item() - 0.05) < 0.01


def test_print_table_breaks_full_world_captions_down_by_objects(capsys):
    from qformer.demo import print_table

    scores = {"i2t_r1": 0.9, "t2i_r1": 0.8}
    metrics = {
        "retrieval": {"itc": scores, "itm": scores}, "plan": {"qa_per_image": 2}, "vqa": {"accuracy": 0.6},
        "caption": {"exact_match": 0.3, "exact_match_by_objects": {"1": 0.85, "2": 0.14, "3": 0.0}, "bleu4": 0.6,
                    "cider": 4.0},
        "ablation": {"without_stage1": {"caption": {"cider": 4.5}}}, "seconds": {"total": 10.0},
    }  # fmt: skip
    print_table(metrics)
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if "of scenes with 1 / 2 / 3 objects" in line)
    assert row.split()[-5:] == ["0.850", "/", "0.140", "/", "0.000"]
    assert "ablation: CIDEr without stage 1" in next(line for line in lines if "4.500" in line)  # an older file
    metrics["caption"]["exact_match_by_objects"] = {"1": 0.3}  # the simple world: no breakdown
    metrics["ablation"]["without_stage1"] = {"caption": {"exact_match": 0.25, "cider": 4.5}, "vqa": {"accuracy": 0.55}}
    print_table(metrics)
    lines = capsys.readouterr().out.splitlines()
    assert not any("of scenes with" in line for line in lines)
    row = next(line for line in lines if line.startswith("ablation without stage 1"))
    assert row.split()[-5:] == ["0.250", "/", "4.500", "/", "0.550"]
    assert "--seeds" in lines[lines.index(row) + 1]  # the row is one seed: how to pair several


def test_cpu_model_reads_proc_cpuinfo():
    from qformer.demo import cpu_model

    intel = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz\n"
    assert cpu_model(intel * 2) == "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"
    assert cpu_model("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f\n") == "AMD EPYC"
    # ARM boards: no "model name"; a Raspberry Pi names itself in "Model"
    assert cpu_model("processor\t: 0\nBogoMIPS\t: 108.00\n\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n") == (
        "Raspberry Pi 4 Model B Rev 1.4"
    )
    assert cpu_model("processor\t: 0\nmodel name\t: \nBogoMIPS\t: 50.00\n") is None  # empty: none named
    assert cpu_model("") is None


def test_print_table_names_the_machine(capsys):
    from qformer.demo import machine_row, print_table

    scores = {"i2t_r1": 0.9, "t2i_r1": 0.8}
    metrics = {
        "retrieval": {"itc": scores, "itm": scores}, "plan": {"qa_per_image": 2}, "vqa": {"accuracy": 0.6},
        "caption": {"exact_match": 0.3, "bleu4": 0.6, "cider": 4.0}, "seconds": {"total": 10.0},
        "ablation": {"without_stage1": {"caption": {"cider": 4.5}}},
        "machine": {"cpu": "AMD EPYC", "cores": 2, "cpu_capability": "AVX512", "torch_threads": 2, "torch": "2.14.1"},
    }  # fmt: skip
    print_table(metrics)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("machine"))
    assert row.split(None, 1)[1] == "AMD EPYC, 2 cores (AVX512), torch 2.14.1"
    assert machine_row({**metrics["machine"], "gpu": "NVIDIA H100"}).endswith(", torch 2.14.1, NVIDIA H100")
    del metrics["machine"]  # an older metrics file: no row
    print_table(metrics)
    assert not any(line.startswith("machine") for line in capsys.readouterr().out.splitlines())


def test_calibration_reads_the_median_step_after_the_warmup():
    from qformer.demo import per_step

    # steps end at these times: the first two (warm-up) and one slow step are not what a step costs
    marks = [5.0, 9.0, 9.5, 10.0, 12.0, 12.5, 13.0]
    assert per_step(marks, warmup=2) == 0.5  # the mean of the same intervals is 0.8
    assert per_step([0.0, 1.0, 3.0], warmup=1) == 1.5
    with pytest.raises(RuntimeError, match="calibration ran 2 steps, need more than 2"):
        per_step([1.0, 2.0], warmup=2)
