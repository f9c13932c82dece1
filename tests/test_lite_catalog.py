"""The EfficientNet-Lite catalog job (train.lite_catalog) on its smoke config, and its refusals."""

from __future__ import annotations

import itertools
import json
import os
import textwrap

import numpy as np
import pytest

from export import quantize

from conftest import ROOT, run_job

CONFIG = os.path.join(ROOT, "configs", "clips_lite_catalog.py")


@pytest.fixture(scope="module")
def smoke_catalog(tmp_path_factory) -> tuple[str, str]:
    """The smoke catalog, built once by the real command line; ``(workdir, stdout)``."""
    workdir = str(tmp_path_factory.mktemp("lite_catalog") / "w")
    proc = run_job(
        "train.lite_catalog", f"--config={CONFIG}:smoke", f"--workdir={workdir}", "--threads=1",
        check=True,
    )  # fmt: skip
    return workdir, proc.stdout


def _catalog(workdir: str) -> dict:
    with open(os.path.join(workdir, "catalog.json")) as f:
        return json.load(f)


def test_lite_catalog_smoke_rows_verify_and_quantized_files_are_smaller(smoke_catalog):
    from flexjax.io import sha256_file

    workdir, stdout = smoke_catalog
    cat = _catalog(workdir)
    rows = cat["tasks"]["imagenet"]["variants"]
    assert [r["name"] for r in rows] == ["lite0_64_fp32", "lite0_64_int8", "lite0_64_mixed4"]
    assert cat["tasks"]["imagenet"]["original"] == rows[0]["name"]
    for r in rows:
        path = os.path.join(workdir, r["file"])
        assert r["bytes"] == os.path.getsize(path) and r["sha256"] == sha256_file(path)
        assert r["name"] in stdout  # the printed table covers every row
    fp32 = rows[0]["bytes"]
    by_name = {r["weights"]: r for r in rows}
    # int8 weights (converter) and 4/8-bit weights (litert-quantizer): well under half of fp32.
    assert by_name["int8"]["bytes"] < fp32 / 2
    assert by_name["mixed4"]["bytes"] < fp32 / 2
    # Same network, same resolution: same parameter and FLOP counts for every weight format.
    assert len({(r["params"], r["flops"]) for r in rows}) == 1 and rows[0]["params"] > 1e6


def test_lite_catalog_smoke_agreement_comes_from_the_litert_runs(smoke_catalog):
    from pipelines import lite_catalog
    from runtime.lite import Model

    workdir, _ = smoke_catalog
    cat = _catalog(workdir)
    rows = cat["tasks"]["imagenet"]["variants"]
    config = _smoke_config()
    data = lite_catalog.load_frames(config, [64], need_calibration=False)
    labels = data["labels"]
    assert len(labels) == cat["data"]["test_frames"] == len(rows[0]["top1"]) > 0
    orig = np.asarray(rows[0]["top1"])
    for r in rows:
        top1 = np.asarray(r["top1"])
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["agreement_original"] <= 1.0
        assert r["accuracy"] == pytest.approx(float(np.mean(top1 == labels)))
        assert r["agreement_original"] == pytest.approx(float(np.mean(top1 == orig)))
        assert r["accuracy_drop_points"] == pytest.approx(
            100 * (rows[0]["accuracy"] - r["accuracy"])
        )
        # The recorded top-1 is what the exported file gives in LiteRT on the test frames.
        sig = Model(os.path.join(workdir, r["file"])).signature("full")
        again = [int(np.argmax(sig(np.ascontiguousarray(x[None])))) for x in data["test"][64]]
        assert again == r["top1"]
    assert rows[0]["agreement_original"] == 1.0


def test_lite_catalog_smoke_is_readable_by_the_ams_runtime_and_targets_match_rows(smoke_catalog):
    from runtime.ams.catalog import load_catalog

    workdir, _ = smoke_catalog
    cat = _catalog(workdir)
    rows = cat["tasks"]["imagenet"]["variants"]
    loaded = load_catalog(workdir)
    opts = {o.variant: o for o in loaded.options["imagenet"]}
    assert set(opts) == {r["name"] for r in rows}
    for r in rows:
        o = opts[r["name"]]
        assert o.mem_bytes == r["bytes"] and o.latency_ms == r["latency_ms"] > 0
        assert o.load_ms == r["load_ms"] > 0 and o.energy_j > 0
        assert r["latency_ratio"] == pytest.approx(rows[0]["latency_ms"] / r["latency_ms"])
        assert r["memory_ratio"] == pytest.approx(rows[0]["bytes"] / r["bytes"])
    for key, t in cat["targets"].items():
        ok = [r for r in rows[1:] if r["accuracy_drop_points"] <= t["max_drop_points"]]
        assert t["met"] == any(r[key] >= t["target"] for r in ok)


def test_lite_catalog_rerun_reuses_every_variant(smoke_catalog):
    workdir, _ = smoke_catalog
    before = {r["name"]: r["sha256"] for r in _catalog(workdir)["tasks"]["imagenet"]["variants"]}
    proc = run_job(
        "train.lite_catalog", f"--config={CONFIG}:smoke", f"--workdir={workdir}", "--threads=1",
        check=True,
    )  # fmt: skip
    assert all(f"{n}: reused" in proc.stdout for n in before), proc.stdout
    after = {r["name"]: r["sha256"] for r in _catalog(workdir)["tasks"]["imagenet"]["variants"]}
    assert after == before


def _smoke_config():
    from flexjax import config as config_lib

    return config_lib.validate(config_lib.load(f"{CONFIG}:smoke"), config_lib.lite_catalog_defaults)


# --- bad input: one error line, non-zero exit, nothing written --------------------------------

_BAD = {
    "unknown_weights": ('c.weights = ("fp32", "int3")', "unknown weights 'int3'"),
    "int4_blockwise_conv": (
        'c.recipes = [{"name": "q", "rules": [{"op": "CONV_2D", "bits": 4, '
        '"granularity": "blockwise_32", "mode": "dynamic"}]}]; c.weights = ("q",)',
        "does not support dynamic int4 blockwise_32 weights on CONV_2D",
    ),
    "unknown_mode": (
        'c.recipes = [{"name": "q", "rules": [{"op": "CONV_2D", "bits": 4, '
        '"granularity": "channelwise", "mode": "fancy"}]}]',
        "unknown mode 'fancy'",
    ),
    "resolution_above_frames": ("c.resolutions = (128,)", "resolution 128 px is out of range"),
    "resolution_below_domain": ("c.resolutions = (16,)", "config key 'resolutions'"),
    "original_resolution_huge": ("c.original.resolution = 5000", "original.resolution"),
    "unknown_model": ('c.originals = ("efficientnet_b7",)', "unknown model 'efficientnet_b7'"),
    "extra_without_weights": (
        'c.extras = [{"model": "efficientnet_lite0", "resolution": 64}]',
        "extras[0] must be",
    ),
    "unknown_granularity": (
        'c.recipes = [{"name": "q", "rules": [{"op": "FULLY_CONNECTED", "bits": 4, '
        '"granularity": "blockwise_48", "mode": "dynamic"}]}]',
        "unknown granularity 'blockwise_48'",
    ),
}


@pytest.mark.parametrize("case", sorted(_BAD))
def test_lite_catalog_bad_config_is_one_error_line_and_writes_nothing(case, tmp_path):
    change, message = _BAD[case]
    cfg = tmp_path / "bad.py"
    cfg.write_text(textwrap.dedent(f"""
        from configs.clips_lite_catalog import get_config as _smoke


        def get_config():
            c = _smoke("smoke")
            {change}
            return c
    """))  # fmt: skip
    workdir = tmp_path / "w"
    proc = run_job("train.lite_catalog", f"--config={cfg}", f"--workdir={workdir}", timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert message in lines[0], lines[0]
    assert not workdir.exists()


def test_quantize_check_recipe_accepts_exactly_what_the_quantizer_policy_lists():
    """Every (op, mode, bits, granularity) over EfficientNet-Lite's ops: the policy decides."""
    n_ok = n_bad = 0
    for op, mode, bits, gran in itertools.product(
        ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD"), quantize.MODES,
        quantize.BITS, quantize.GRANULARITIES,
    ):  # fmt: skip
        rule = {"op": op, "bits": bits, "granularity": gran, "mode": mode}
        if f"{mode} int{bits} {gran}" in quantize.supported(op):
            assert quantize.check_recipe([rule]) == [rule]
            n_ok += 1
        else:
            with pytest.raises(quantize.QuantizeError, match="does not support") as e:
                quantize.check_recipe([rule])
            assert "\n" not in str(e.value)
            n_bad += 1
    # The quantizer's own policy: blockwise 4-bit only on FULLY_CONNECTED; nothing for ADD.
    assert "dynamic int4 blockwise_32" in quantize.supported("FULLY_CONNECTED")
    assert not any("blockwise" in s for s in quantize.supported("CONV_2D"))
    assert quantize.supported("ADD") == []
    assert n_ok > 10 and n_bad > 50


def test_quantize_int4_weight_only_runs_like_fp32_with_the_dequantized_weights(smoke_catalog):
    """LiteRT runs litert-quantizer's 4-bit weights faithfully: what changes is the weights."""
    from pipelines import lite_catalog
    from runtime.lite import Model

    workdir, _ = smoke_catalog
    with open(os.path.join(workdir, "variants", "lite0_64_fp32.tflite"), "rb") as f:
        fp32 = f.read()
    rule = {"op": "CONV_2D", "bits": 4, "granularity": "channelwise", "mode": "weight_only"}
    int4 = quantize.quantize(fp32, [rule], "w4")
    twin = quantize.dequantized_float_model(fp32, int4)
    assert len(int4) < len(fp32) / 2  # the 1x1 / 3x3 conv weights are most of Lite0
    frames = lite_catalog.load_frames(_smoke_config(), [64], need_calibration=False)["test"][64]
    outs = {}
    for name, buf in (("fp32", fp32), ("int4", int4), ("twin", twin)):
        sig = Model.from_bytes(buf).signature("full")
        outs[name] = np.concatenate([sig(np.ascontiguousarray(x[None])) for x in frames])
    scale = np.abs(outs["fp32"]).max()
    assert np.abs(outs["int4"] - outs["twin"]).max() <= 1e-4 * scale
    assert np.abs(outs["int4"] - outs["fp32"]).max() > 1e-2 * scale  # 4 bits do change things
