"""Stage signatures (issue 17.4): one interpreter call per early-exit stage, and the old path.

A bundle's ``stage_<k>`` runs ``segment_<k>`` and then ``exit_<k>`` in one graph with two
outputs (activation, logits). These tests prove the outputs equal the two calls', the
executor's results and the bundle's calibration are unchanged by it, bundles without stage
signatures still verify and run the two-call path, and verification refuses stage entries
that cannot be right.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from flexjax import exits as exits_lib
from runtime import Bundle, BundleError, EarlyExitExecutor, criteria, data
from runtime.bench import expected_time
from runtime.lite import Model
from runtime.names import MANIFEST, MANIFEST_DIGEST, STAGE_OUTPUTS


@pytest.fixture
def copy(smoke_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(smoke_bundle, dst)
    return str(dst)


def _rewrite(path: str, edit) -> None:
    with open(os.path.join(path, MANIFEST)) as f:
        m = json.load(f)
    edit(m)
    raw = json.dumps(m).encode()
    with open(os.path.join(path, MANIFEST), "wb") as f:
        f.write(raw)
    with open(os.path.join(path, MANIFEST_DIGEST), "w") as f:
        f.write(hashlib.sha256(raw).hexdigest() + "\n")


def _frames(bundle):
    return data.load("mnist5k:test", bundle.manifest)


def _strip_stages(m: dict) -> None:
    """What a bundle exported before stage signatures lists (its model may still hold them)."""
    for e in m["exits"]:
        m["signatures"].pop(e.pop("stage", None) or "", None)


def test_stage_signature_outputs_equal_segment_then_head(smoke_bundle):
    b = Bundle.from_dir(smoke_bundle)
    model = b.load()
    e = b.exits[0]
    assert e.stage == "stage_2"
    stage = model.signature(e.stage, STAGE_OUTPUTS)
    seg, head = model.signature(e.segment), model.signature(e.head)
    assert stage.output_names == STAGE_OUTPUTS
    assert stage.output_shapes == (seg.output_shape, head.output_shape)
    for x in _frames(b).x[:40]:
        x = np.ascontiguousarray(x[None])
        act, logits = stage(x)
        h = seg(x)
        np.testing.assert_allclose(act, h, rtol=0, atol=1e-6)
        np.testing.assert_allclose(logits, head(h), rtol=0, atol=1e-6)


def test_signature_outputs_come_in_the_order_asked_and_names_are_checked(smoke_bundle):
    model = Bundle.from_dir(smoke_bundle).load()
    assert set(model.output_names("stage_2")) == set(STAGE_OUTPUTS)
    x = np.random.default_rng(0).random(model.signature("segment_2").input_shape, np.float32)
    act, logits = model.signature("stage_2", ("activation", "logits"))(x)
    logits2, act2 = model.signature("stage_2", ("logits", "activation"))(x)
    np.testing.assert_array_equal(act, act2)
    np.testing.assert_array_equal(logits, logits2)
    assert logits.shape == (1, 10) and act.ndim == 4
    with pytest.raises(ValueError, match="2 outputs"):
        model.signature("stage_2")  # a several-output signature needs its output names
    for bad in (("activation",), ("activation", "scores"), ("logits", "logits", "activation")):
        with pytest.raises(ValueError, match="asked for"):
            model.signature("stage_2", bad)


def test_executor_one_call_per_stage_gives_the_two_call_results(smoke_bundle):
    b = Bundle.from_dir(smoke_bundle)
    two = EarlyExitExecutor(b, stage_signatures=False)
    frames = _frames(b)
    logits = two.all_logits(frames.x)
    # A threshold that splits the frames, so both exits are taken.
    h = float(np.median(-criteria.score(logits["exit_2"], "entropy")))
    one = EarlyExitExecutor(b, thresholds={"exit_2": h})
    two = EarlyExitExecutor(b, thresholds={"exit_2": h}, model=one.model, stage_signatures=False)
    assert one.calls_per_stage == (1, 1) and two.calls_per_stage == (2, 1)
    for name, v in one.all_logits(frames.x).items():
        np.testing.assert_allclose(v, logits[name], rtol=0, atol=1e-6)
    a = [one.run(x) for x in frames.x]
    c = [two.run(x) for x in frames.x]
    assert [r.exit for r in a] == [r.exit for r in c]
    assert [r.prediction for r in a] == [r.prediction for r in c]
    assert 0 < sum(r.index == 0 for r in a) < len(a)
    (la, wa), (lc, wc) = one.run_batch(frames.x), two.run_batch(frames.x)
    np.testing.assert_array_equal(wa, wc)
    np.testing.assert_allclose(la, lc, rtol=0, atol=1e-6)
    # Without heads there is nothing to fuse: segments only, one call each.
    assert EarlyExitExecutor(b, heads=False, model=one.model).calls_per_stage == (1, 1)


def test_calibration_is_that_of_the_two_call_path(smoke_bundle):
    # The bundle's thresholds and test results were computed through the stage signatures;
    # recomputing them through segment + head gives the same decisions and accuracy.
    b = Bundle.from_dir(smoke_bundle)
    m = b.manifest
    two = EarlyExitExecutor(b, stage_signatures=False)
    test = data.load("mnist5k:test", m)
    n = m["test"]["examples"]
    logits = two.all_logits(test.x[:n])
    sim = exits_lib.simulate(
        logits, test.y[:n], m["calibration"]["thresholds"], m["criterion"],
        names=tuple(e.name for e in b.exits),
    )  # fmt: skip
    assert sim.accuracy == pytest.approx(m["test"]["accuracy"])
    assert sim.rates == pytest.approx(m["test"]["exit_rates"])
    one = EarlyExitExecutor(b)
    assert [one.run(x).index for x in test.x[:n]] == list(sim.exit_index)


def test_bundle_without_stage_signatures_verifies_and_runs_two_calls(smoke_bundle, copy):
    _rewrite(copy, _strip_stages)
    old = Bundle.from_dir(copy)
    assert all(e.stage is None for e in old.exits)
    assert "stage_2" not in old.manifest["signatures"]
    ex_old = EarlyExitExecutor(old)
    assert ex_old.calls_per_stage == (2, 1)
    ex_new = EarlyExitExecutor(Bundle.from_dir(smoke_bundle))
    for x in _frames(old).x[:30]:
        a, c = ex_old.run(x), ex_new.run(x)
        assert (a.exit, a.prediction) == (c.exit, c.prediction)
    # A stage entry of null is the same as none.
    _rewrite(copy, lambda m: m["exits"][0].update(stage=None))
    assert Bundle.from_dir(copy).exits[0].stage is None


def _set_outputs(value):
    return lambda m: m["signatures"]["stage_2"].update(outputs=value)


def _stage_is_full(m):
    """The manifest declares stage outputs for ``full``, whose graph has only its logits."""
    full = m["signatures"]["full"]
    full.pop("output_shape")
    full["outputs"] = m["signatures"]["stage_2"]["outputs"]
    m["exits"][0]["stage"] = "full"


def _stage_cases():
    """(label, manifest edit, expected message) for every rule a stage entry must follow."""
    act = lambda m: m["signatures"]["segment_2"]["output_shape"]  # noqa: E731
    logit = [1, 10]
    outs = lambda names, shapes: [{"name": n, "shape": s} for n, s in zip(names, shapes)]  # noqa: E731
    return [
        ("unknown", lambda m: m["exits"][0].update(stage="stage_9"), "unknown stage"),
        ("not a name", lambda m: m["exits"][0].update(stage=3), "unknown stage"),
        ("on final", lambda m: m["exits"][1].update(stage="stage_2"), "final exit"),
        ("one-output signature", lambda m: m["exits"][0].update(stage="exit_2"), "must declare"),
        (
            "outputs reversed",
            lambda m: _set_outputs(outs(["logits", "activation"], [logit, act(m)]))(m),
            "in that order",
        ),
        (
            "outputs renamed",
            lambda m: _set_outputs(outs(["act", "logits"], [act(m), logit]))(m),
            "must declare",
        ),
        ("one output", lambda m: _set_outputs(outs(["logits"], [logit]))(m), "allowed"),
        (
            "too many outputs",
            lambda m: _set_outputs([{"name": f"o{i}", "shape": logit} for i in range(17)])(m),
            "allowed",
        ),  # fmt: skip
        ("outputs not a list", _set_outputs({"activation": [1]}), "malformed"),
        ("output not a dict", _set_outputs(["activation", "logits"]), "malformed"),
        ("output without name", _set_outputs([{"shape": [1]}, {"shape": [1]}]), "malformed"),
        (
            "output shape not a shape",
            lambda m: _set_outputs(outs(STAGE_OUTPUTS, [act(m), [1, -10]]))(m),
            "positive",
        ),
        (
            "duplicate output",
            lambda m: _set_outputs(outs(["logits", "logits"], [logit, logit]))(m),
            "twice",
        ),
        (
            "output_shape and outputs",
            lambda m: m["signatures"]["stage_2"].update(output_shape=logit),
            "both",
        ),
        (
            "logits shape of another model",
            lambda m: _set_outputs(outs(STAGE_OUTPUTS, [act(m), [1, 11]]))(m),
            "wrong model file",
        ),
        ("the model's stage has other outputs", _stage_is_full, "wrong model file"),
    ]


@pytest.mark.parametrize("case", range(len(_stage_cases())))
def test_stage_entry_that_cannot_be_right_is_refused(copy, case):
    label, edit, message = _stage_cases()[case]
    _rewrite(copy, edit)
    with pytest.raises(BundleError) as e:
        Bundle.from_dir(copy)
    assert message in str(e.value) and "\n" not in str(e.value), (label, str(e.value))


def test_stage_of_a_consistent_but_wrong_signature_is_refused_by_the_model(copy):
    # The manifest agrees with itself but the stage runs the wrong part of the model: its
    # activation is not the segment's (a stage that skips layers would feed garbage on).
    def edit(m):
        m["exits"][0]["segment"] = "full"  # full's input is the image like segment_2's

    _rewrite(copy, edit)
    with pytest.raises(BundleError, match="inconsistent|gives"):
        Bundle.from_dir(copy)


def test_model_from_bytes_keeps_one_signature_per_output_order(smoke_bundle):
    model = Model(os.path.join(smoke_bundle, "model.tflite"))
    a = model.signature("stage_2", STAGE_OUTPUTS)
    assert model.signature("stage_2", list(STAGE_OUTPUTS)) is a
    assert model.signature("segment_2") is model.signature("segment_2")


def test_expected_time_costs_a_timed_stage_as_its_one_call():
    exits = [
        {"name": "exit_1", "segment": "s1", "head": "e1", "stage": "st1"},
        {"name": "exit_2", "segment": "s2", "head": "e2", "stage": "st2"},  # not timed
        {"name": "final", "segment": "sf", "head": None},
    ]
    t = {"s1": 1.0, "e1": 0.5, "st1": 1.25, "s2": 2.0, "e2": 0.5, "sf": 4.0}
    rates = {"exit_1": 0.5, "exit_2": 0.25, "final": 0.25}
    assert expected_time(exits, rates, t) == pytest.approx(
        0.5 * 1.25 + 0.25 * (1.25 + 2.5) + 0.25 * (1.25 + 2.5 + 4.0)
    )
