"""The quality suite's quick mode: what must hold whatever the method.

Small models trained on real data (digits, Python's own text), merged through `merge run`: the experts beat
the base on their own domain, a merge of an expert with itself gives that expert back, and every merged
model loads and scores.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

QUALITY = Path(__file__).resolve().parents[1] / "bench" / "quality"
sys.path.insert(0, str(QUALITY))
pytest.importorskip("sklearn")

import run as quality_run  # noqa: E402
import suite  # noqa: E402


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quality")
    # this test process's share of the CPUs (tests/conftest.py), as every other test here runs with
    assert quality_run.main(["--quick", "--workdir", str(workdir), "--threads", str(torch.get_num_threads())]) == 0
    import json

    return json.loads((workdir / "report.json").read_text())


@pytest.mark.parametrize("modality", ["vision", "text"])
def test_experts_beat_the_base_on_their_own_domain(quick_report, modality):
    for margin in quick_report[modality]["margins"]:
        assert margin["gain_own"] > 0, margin


def test_merging_an_expert_with_itself_gives_it_back(quick_report):
    check = quick_report["self_merge"]
    assert check["identical_tensors"]
    assert check["merged_scores"] == check["expert_scores"]


@pytest.mark.parametrize("modality", ["vision", "text"])
def test_every_method_merges_loads_and_scores(quick_report, modality):
    section = quick_report[modality]
    methods = {row["method"] for row in section["methods"]}
    assert methods == set(suite.DEFAULTS)
    for row in section["methods"]:
        scores = row["test"]
        assert set(scores) == set(section["domains"])
        for value in scores.values():
            assert math.isfinite(value)
            if section["higher_is_better"]:
                assert 0.0 <= value <= 1.0
            else:
                assert 0.0 < value < math.log(257) * 2  # a loss, and not a broken model's
        assert row["seconds"] > 0


def test_different_initialisation_pairs_are_scored(quick_report):
    sections = quick_report["different_init"]
    assert set(sections) == {"same task", "label split", "label split, separate 5-way heads"}
    for name, rows in sections.items():
        names = [r["name"] for r in rows]
        assert names[:3] == ["model A", "model B", "ensemble"]
        assert "PLeaS 1.0x" in names and "permutation only (1.0x)" in names
        assert ("averaging (linear)" in names) == (name != "label split, separate 5-way heads")
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)


@pytest.mark.parametrize("modality", ["vision", "text"])
def test_twin_merging_routes_mixed_inputs_and_stores_little(quick_report, modality):
    section = quick_report["twin"][modality]
    rows = {row["name"]: row for row in section["rows"]}
    default, oracle = rows["twin (rank 0.1, stem, top-1)"], rows["twin, true task given (no router)"]
    assert set(default["scores"]) == set(section["domains"])
    assert default["storage_ratio"] < 0.25 and default["stored_bytes"] > 0
    assert default["router_test_accuracy"] > 0.75 and oracle["router_test_accuracy"] == 1.0
    assert default["overhead"]["ratio"] > 0
    task_arithmetic = next(r for r in quick_report[modality]["methods"] if r["method"] == "task_arithmetic")
    assert default["normalised_average"] > task_arithmetic["normalised_average"]
