"""runtime.encoding: cut-tensor encodings round-trip within their quantization error."""

import math

import numpy as np
import pytest

from runtime import encoding as enc


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", enc.ENCODINGS)
def test_roundtrip_error_is_bounded(seed, name):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(2, 7, 7, 5)) * rng.uniform(0.1, 20)).astype(np.float32)
    if seed % 2:
        x = np.maximum(x, 0)  # post-ReLU activations: zero must stay exact
    e = enc.calibrate(name, [x[:1], x[1:]])
    q = e.encode(x)
    assert q.dtype == e.dtype and q.nbytes == e.nbytes(x.shape)
    r = e.decode(q)
    assert r.dtype == np.float32 and r.shape == x.shape
    if name == "float32":
        assert np.array_equal(r, x)
    elif name == "float16":
        np.testing.assert_allclose(r, x, rtol=1e-3, atol=1e-4)
    else:
        assert np.abs(r - x).max() <= e.scale / 2 + 1e-6
        assert e.roundtrip(np.zeros(3, np.float32)).tolist() == [0.0, 0.0, 0.0]
    assert enc.Encoding.from_json(e.to_json()) == e


def test_float16_saturates_instead_of_inf():
    e = enc.Encoding("float16")
    assert np.all(np.isfinite(e.roundtrip(np.array([1e9, -1e9], np.float32))))


BAD = [
    "float64",
    {"name": "int4"},
    {"name": "int8"},
    {"name": "int8", "scale": 0.0, "zero_point": 0},
    {"name": "int8", "scale": -1.0, "zero_point": 0},
    {"name": "int8", "scale": math.nan, "zero_point": 0},
    {"name": "int8", "scale": math.inf, "zero_point": 0},
    {"name": "int8", "scale": "1", "zero_point": 0},
    {"name": "int8", "scale": 0.1, "zero_point": 128},
    {"name": "int8", "scale": 0.1, "zero_point": 1.5},
    {"name": "int8", "scale": 0.1, "zero_point": True},
    {"name": "float16", "extra": 1},
    [],
    None,
]


@pytest.mark.parametrize("obj", BAD, ids=[repr(b) for b in BAD])
def test_bad_encodings_are_one_error(obj):
    with pytest.raises(enc.EncodingError) as info:
        enc.Encoding.from_json(obj)
    assert "\n" not in str(info.value)


def test_calibration_refuses_nonfinite_and_empty():
    with pytest.raises(enc.EncodingError):
        enc.calibrate("int8", [np.array([1.0, np.nan], np.float32)])
    with pytest.raises(enc.EncodingError):
        enc.calibrate("int8", [np.zeros((0,), np.float32)])
    with pytest.raises(enc.EncodingError):
        enc.Encoding("int8", 1.0, 0).decode(np.zeros(2, np.float32))
