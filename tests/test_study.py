"""`moalign study` at micro size, and the statistics it reports (moalign/evaluation/stats.py)."""

import json

import numpy as np
import pytest
from conftest import micro_recipe

from moalign.evaluation.stats import paired_comparison, seeds_prompts_ci
from moalign.playground.study import StudyConfig, run_study


def test_two_way_interval_carries_the_spread_between_seeds():
    rng = np.random.default_rng(0)
    prompts = rng.normal(0.0, 1.0, size=40)
    # seeds shift every prompt alike: a bootstrap over prompts alone would not see that spread
    table = prompts[None, :] + np.array([-2.0, 0.0, 2.0])[:, None]
    mean, low, high = seeds_prompts_ci(table)
    assert mean == pytest.approx(table.mean())
    assert high - low > 2.0  # the seed offsets (+-2) widen it
    same_seed = np.repeat(prompts[None, :], 3, axis=0)
    _, low1, high1 = seeds_prompts_ci(same_seed)
    assert high1 - low1 < 1.2 and (high1 - low1) < (high - low)
    assert seeds_prompts_ci(np.full((2, 5), 0.5)) == (0.5, 0.5, 0.5)  # no spread: the mean itself
    with pytest.raises(ValueError, match="seeds, prompts"):
        seeds_prompts_ci(np.zeros(4))


def test_paired_comparison_finds_a_shift_and_not_noise():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(3, 30))  # prompts differ a lot; pairing removes that
    shifted = paired_comparison(base + 0.3 + rng.normal(0, 0.05, size=base.shape), base)
    assert shifted["low"] > 0.2 and shifted["high"] < 0.4 and shifted["p_wilcoxon"] < 1e-4
    assert len(shifted["per_seed"]) == 3 and all(v > 0.2 for v in shifted["per_seed"])
    noise = paired_comparison(base + rng.normal(0, 0.05, size=base.shape), base)
    assert noise["low"] < 0 < noise["high"] and noise["p_wilcoxon"] > 0.01
    same = paired_comparison(base, base)
    assert same["diff"] == 0 and same["p_wilcoxon"] == 1.0 and np.isnan(same["p_seeds"])
    per_seed = paired_comparison(np.array([1.0, 1.2, 1.1]), np.array([0.5, 0.6, 0.7]))  # one value per seed
    assert per_seed["diff"] == pytest.approx(0.5) and per_seed["p_seeds"] < 0.05
    # one value per seed: Student's t over the 3 seeds (t_0.975,2 = 4.303), not a 10-resample bootstrap
    half = 4.302653 * np.std([0.5, 0.6, 0.4], ddof=1) / np.sqrt(3)
    assert per_seed["low"] == pytest.approx(0.5 - half) and per_seed["high"] == pytest.approx(0.5 + half)


def test_study_config_names_its_baseline_and_primary_metric():
    with pytest.raises(ValueError, match="include 'none'"):
        StudyConfig(arms=("trd", "moalign"))
    with pytest.raises(ValueError, match="primary_metric"):
        StudyConfig(primary_metric="fvd")
    with pytest.raises(ValueError, match="distinct"):
        StudyConfig(seeds=(0, 0))


def test_study_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr("moalign.presets.get_preset", lambda name: micro_recipe())
    summary = run_study(tmp_path, progress=False)
    root = tmp_path / "study"
    report = (root / "report.md").read_text()
    assert "**Primary metric, named before running: Joint (%).**" in report
    assert "| moalign - none | Joint (%) |" in report and "clips through the base VAE" in report
    assert summary["primary_metric"] == "joint" and summary["aligned_block"] == 1
    for key, c in summary["comparisons"].items():
        assert c["low"] <= c["diff"] + 1e-9 and c["diff"] <= c["high"] + 1e-9, key
        assert len(c["per_seed"]) == 2
    for seed in (0, 1):
        runs = {
            a: json.loads((root / "runs" / a / f"seed-{seed}" / "study.json").read_text())
            for a in ("none", "moalign")
        }
        for r in runs.values():
            assert sorted(r["probes"], key=int) == ["0", "1", "2"] and len(r["videos"]) == 4
            assert "motion" in r["frechet"]
        # the same start and noise: step 0 equal across arms, and the no-alignment arm has no alignment loss
        assert runs["none"]["probes"]["0"] == runs["moalign"]["probes"]["0"]
        logs = {
            a: (root / "runs" / a / f"seed-{seed}" / "log.jsonl").read_text().splitlines()[0] for a in runs
        }
        assert json.loads(logs["none"])["diffusion"] == json.loads(logs["moalign"])["diffusion"]
    first = [
        json.loads((root / "runs" / "none" / f"seed-{s}" / "log.jsonl").read_text().splitlines()[0])
        for s in (0, 1)
    ]
    assert first[0]["diffusion"] != first[1]["diffusion"]  # another seed: other clips and noise
    for name in ("curves.png", "side_by_side.gif", "summary.json"):
        assert (root / name).is_file()
    assert (tmp_path / "arms").exists() is False  # the study's runs live under study/, not the demo's arms/

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    for target in ("moalign.stage2.train_stage2", "moalign.generate.generate",
                   "moalign.evaluation.dit_probes.probe_run", "moalign.stage1.train_stage1"):  # fmt: skip
        monkeypatch.setattr(target, must_not_run)
    again = run_study(tmp_path, progress=False)
    assert json.dumps(again["comparisons"]) == json.dumps(summary["comparisons"])  # nan != nan: compare text


def test_study_command_binds_arms_seeds_and_from_scratch(monkeypatch):
    from moalign.cli import main

    seen = {}
    monkeypatch.setattr("moalign.playground.study.run_study", lambda out, **kw: seen.update(out=out, **kw))
    assert main(["study", "--out", "x", "--arms", "all", "--seeds", "3,4", "--from-scratch", "--quiet"]) == 0
    cfg = seen["recipe"].study
    assert cfg.arms == ("none", "repa", "trd", "raw-moalign", "motion-trd", "moalign") and cfg.seeds == (3, 4)
    assert cfg.from_scratch and seen["out"] == "x" and seen["progress"] is False
    assert main(["study", "--set", "study.eval_clips=8"]) == 0 and seen["recipe"].study.eval_clips == 8
    assert seen["recipe"].study.arms == ("none", "trd", "moalign") and not seen["recipe"].study.from_scratch
    assert main(["study", "--arms", "trd,moalign"]) == 2  # no baseline: a config error, exit 2


def test_a_folder_made_with_other_settings_is_refused(tmp_path):
    from dataclasses import replace

    from moalign.errors import MoalignError
    from moalign.playground.demo import DEMO_PARTS, check_recipe

    recipe = micro_recipe()
    check_recipe(tmp_path, recipe, DEMO_PARTS, "moalign demo")  # a new folder: recorded
    check_recipe(tmp_path, recipe, (*DEMO_PARTS, "study"), "moalign study")  # the same parts and one more
    changed = replace(recipe, study=replace(recipe.study, eval_clips=6))
    with pytest.raises(MoalignError, match=r"study.eval_clips: 4 -> 6(.|\n)*new --out folder"):
        check_recipe(tmp_path, changed, (*DEMO_PARTS, "study"), "moalign study")
    arms = replace(
        recipe, demo=replace(recipe.demo, arm_training=replace(recipe.demo.arm_training, steps=12))
    )
    with pytest.raises(MoalignError, match="demo.arm_training.steps: 2 -> 12") as err:
        check_recipe(tmp_path, arms, DEMO_PARTS, "moalign demo")
    assert f"moalign demo --out {tmp_path} --set demo.arm_training.steps=2" in str(err.value)  # the way back
    check_recipe(tmp_path, recipe, DEMO_PARTS, "moalign demo")  # the recorded settings still pass
