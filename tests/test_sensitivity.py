"""Per-layer approximations chosen by measured sensitivity (`flexjax.sensitivity`; issue 15).

On the smoke data (pretrained Lite0 at 64 px, a few real clip frames): the
in-place measurement of one option is the function of the really approximated
net; the greedy allocation orders upgrades by parameters saved per KL; the
bisection returns the longest prefix within the budget; and the catalog job
builds, exports and measures a sensitivity variant like any other (val clips
only), reusing the pass on a rerun.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest

from conftest import ROOT

CONFIG = os.path.join(ROOT, "configs", "clips_lite_catalog.py")


@pytest.fixture(scope="module")
def lite0_smoke():
    """Lite0 at 64 px and the smoke config's val frames (float) and their reference labels."""
    from flexjax import config as config_lib
    from flexjax.data import clips as clips_lib
    from flexjax.models import pretrained
    from pipelines import lite_catalog

    c = config_lib.validate(config_lib.load(f"{CONFIG}:smoke"), config_lib.lite_catalog_defaults)
    data = lite_catalog.load_frames(c, [64], need_calibration=False, need_distill=True)
    net, variables = pretrained.load("efficientnet_lite0", 64)
    return net, variables, clips_lib.to_float(data["val"]), np.asarray(data["val_labels"])


def test_sensitivity_in_place_options_equal_the_really_approximated_nets(lite0_smoke):
    """One compiled forward measures every option: it must be the exported net's function."""
    from flexjax import approx, sensitivity

    net, variables, x, _ = lite0_smoke
    opts = sensitivity.options(net, variables, {"energies": [0.8], "keeps": [0.5]})
    prune = next(o for o in opts if o["technique"] == "prune_expansion" and o["site"] == "layer_07")
    lowrank = next(o for o in opts if o["technique"] == "low_rank_1x1" and "project" not in o)
    scorer = sensitivity.Scorer(net, x)
    base = scorer.logits(variables)
    for opt in (prune, lowrank):
        in_place = scorer.logits(sensitivity.apply_in_place(net, variables, opt))
        steps = sensitivity.to_steps(net, variables, {opt["knob"]: opt}, {})
        n2, v2 = approx.apply_recipe(net, variables, steps)
        real = sensitivity.Scorer(n2, x).logits(v2)
        assert np.abs(in_place - base).max() > 1e-2, opt  # the option changes something
        np.testing.assert_allclose(in_place, real, atol=1e-3 * np.abs(real).max())
        removed = _count(variables) - _count(v2)
        if opt["technique"] == "prune_expansion":
            assert removed == opt["params_saved"]  # kernels + BN scale/bias of the dropped channels
        else:
            assert removed == opt["params_saved"] > 0


def _count(variables) -> int:
    return sum(np.size(a) for a in jax.tree.leaves(variables["params"]))


def _row(knob, saved, kl):
    return {"knob": knob, "params_saved": saved, "kl": kl, "technique": "low_rank_1x1"}


def test_sensitivity_allocate_takes_most_saving_per_kl_first_and_upgrades_a_knob():
    """Hand-computed order: a: 100/0.1 = 1000, b: 50/1.0 = 50, a's upgrade 100/0.05 = 2000."""
    from flexjax import sensitivity

    rows = [_row("a", 100, 0.1), _row("a", 200, 0.15), _row("b", 50, 1.0)]
    moves = sensitivity.allocate(rows)
    # a@200 alone: 200/0.15 = 1333 > a@100's 1000, so it comes first; then b.
    assert [(m["knob"], m["params_saved"]) for m in moves] == [("a", 200), ("b", 50)]
    assert [m["total_params_saved"] for m in moves] == [200, 250]
    assert math.isclose(moves[-1]["total_kl"], 1.15)
    # b@50 / 0.02 = 2500 beats a@300's 1500 and a@100's 1000; then a@300; a@100 never
    # (it would save less than a's current setting).
    rows = [_row("a", 100, 0.1), _row("a", 300, 0.2), _row("b", 50, 0.02)]
    moves = sensitivity.allocate(rows)
    assert [(m["knob"], m["params_saved"]) for m in moves] == [("b", 50), ("a", 300)]
    chosen = sensitivity.assignment(moves, 2)
    assert chosen["a"]["params_saved"] == 300 and len(chosen) == 2


def test_sensitivity_choose_returns_the_longest_measured_prefix_within_the_budget(lite0_smoke):
    from flexjax import sensitivity

    net, variables, x, labels = lite0_smoke
    settings = {"budget_pts": 30.0, "metric": "original", "parts": ["classifier"],
                "energies": [0.9, 0.8]}  # fmt: skip
    result = sensitivity.run_pass(net, variables, x, labels, settings, log=lambda s: None)
    checks = {c["moves"]: c for c in result["checks"]}
    k = result["moves"]
    assert result["val"]["ok"] and checks[k]["ok"]
    # Every measured longer prefix is over the budget (the bisection's invariant).
    assert all(not c["ok"] for m, c in checks.items() if m > k)
    if k < len(result["moves_list"]):
        assert k + 1 in checks and not checks[k + 1]["ok"]
    lost = 100 * (1 - result["val"]["kept_original"])
    assert lost <= 30.0
    json.dumps(result)  # plain data: the catalog stores it


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"budget_pts": 0}, "budget_pts"),
        ({"budget_pts": -1.0}, "budget_pts"),
        ({"budget_pts": float("nan")}, "budget_pts"),
        ({"budget_pts": float("inf")}, "budget_pts"),
        ({"budget_pts": True}, "budget_pts"),
        ({"energies": []}, "energies"),
        ({"energies": [0.0]}, "energies"),
        ({"keeps": [float("nan")]}, "keeps"),
        ({"parts": ["stem"]}, "unknown ['stem']"),
        ({"min_keep_original": 1.5}, "min_keep_original"),
        ({"table_frames": -1}, "table_frames"),
        ({"nope": 1}, "unknown sensitivity settings"),
    ],
)
def test_sensitivity_bad_settings_are_one_line_errors(settings, message):
    from flexjax import sensitivity

    with pytest.raises(sensitivity.SensitivityError) as e:
        sensitivity.check_settings(settings)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sensitivity_variant_is_built_exported_and_measured_by_the_catalog(tmp_path):
    """The catalog job with a sensitivity approximation (budget large enough to take a move)."""
    from flexjax import config as config_lib
    from pipelines import lite_catalog
    from runtime.lite import Model

    c = config_lib.validate(config_lib.load(f"{CONFIG}:smoke"), config_lib.lite_catalog_defaults)
    c.weights = ("fp32",)
    settings = {"budget_pts": 100.0, "metric": "original", "parts": ["classifier"],
                "energies": [0.8]}  # fmt: skip
    c.approximations = [{"name": "s", "sensitivity": settings}]
    c.extras = [{"model": "efficientnet_lite0", "resolution": 64, "weights": "fp32", "approx": "s"}]
    c.finetune.steps = 0
    logs = []
    report = lite_catalog.run(c, str(tmp_path), log=logs.append)
    p = report["sensitivity"]["s"]
    assert p["moves"] == p["of_moves"] == 1  # the whole budget: the one move is taken
    ranks = p["steps"][0]["ranks"]
    rows = {r["name"]: r for r in report["tasks"]["imagenet"]["variants"]}
    row = rows["lite0_64_s_fp32"]
    assert row["ranks"] == ranks and row["spec"]["approx"]["steps"] == p["steps"]
    assert row["params"] < rows["lite0_64_fp32"]["params"]
    assert row["bytes"] < rows["lite0_64_fp32"]["bytes"]  # the factors really are in the file
    Model(os.path.join(tmp_path, row["file"])).signature("full")  # LiteRT loads it
    with open(os.path.join(tmp_path, "sensitivity", "s.json")) as f:
        saved = json.load(f)
    assert saved["key"]["val_clips"] == c.clips.val != c.clips.test  # chosen on val, not test
    # A rerun reuses the pass and the variant.
    logs.clear()
    lite_catalog.run(c, str(tmp_path), log=logs.append)
    assert "sensitivity s: reused (1 moves)" in logs and "lite0_64_s_fp32: reused" in " ".join(logs)
