"""sparkgd.codecs: gradient codecs as pure functions (no Spark)."""
import struct

import numpy as np
import pytest

from sparkgd import codecs
from sparkgd.codecs import CodecError, decode, encode, parse


def gradient(n=2000, seed=0):
    """A partial gradient as a task sends it: a sum over rows, so large and uneven."""
    rng = np.random.default_rng(seed)
    return rng.standard_t(3, size=n) * 1e5


def test_parse_accepts_the_contracts_values_and_says_what_is_wrong():
    assert parse("none") == codecs.NONE and not parse("none").lossy
    assert parse("FP16").name == "fp16"
    assert parse("topk:0.01") == codecs.Codec("topk", fraction=0.01)
    assert parse("qsgd:8") == codecs.Codec("qsgd", bits=8)
    assert str(parse("topk:0.1")) == "topk:0.1" and str(parse("qsgd:4")) == "qsgd:4"
    # the hub sends str(codec) to the tasks: it must parse back to the same k
    for f in (0.1234567, 1 / 3, 0.33333333, 1e-7):
        codec = codecs.Codec("topk", fraction=f)
        assert parse(str(codec)) == codec
    for bad, msg in (("gzip", "unknown compression"), ("topk:0", "fraction in"),
                     ("topk:1.5", "fraction in"), ("topk:x", "unknown compression"),
                     ("qsgd:1", "bits in 2..16"), ("qsgd:17", "bits in 2..16")):
        with pytest.raises(ValueError, match=msg):
            parse(bad)


@pytest.mark.parametrize("spec", ["none", "fp16", "topk:0.01", "topk:1", "qsgd:2", "qsgd:8",
                                  "qsgd:16"])
def test_encodings_take_the_bytes_they_say(spec):
    codec = parse(spec)
    for n in (0, 1, 7, 2000):
        data, _ = encode(codec, gradient(n), seed=(1, 2, 3))
        assert len(data) == codec.nbytes(n)
        assert decode(codec, data, n).shape == (n,)


def test_none_is_exact_and_fp16_is_scaled_half_precision():
    v = gradient()
    assert np.array_equal(decode(parse("none"), encode(parse("none"), v)[0], v.size), v)
    fp16 = parse("fp16")
    got = decode(fp16, encode(fp16, v)[0], v.size)
    top = np.abs(v).max()
    assert top > 65504                       # unscaled float16 would overflow here
    np.testing.assert_allclose(got, v, rtol=2.0 ** -11, atol=2.0 ** -24 * top)
    assert np.array_equal(decode(fp16, encode(fp16, np.zeros(5))[0], 5), np.zeros(5))
    with pytest.raises(CodecError, match="non-finite"):
        encode(fp16, np.array([1.0, np.inf]))
    assert fp16.nbytes(2000) / parse("none").nbytes(2000) <= 0.2505


def test_topk_sends_the_largest_and_error_feedback_loses_nothing():
    codec = parse("topk:0.01")
    vs = [gradient(2000, seed=s) for s in range(30)]
    residual, sent = None, np.zeros(2000)
    for v in vs:
        data, new = encode(codec, v, residual)
        got = decode(codec, data, v.size)
        u = v if residual is None else v + residual
        assert np.count_nonzero(got) == 20
        chosen = np.flatnonzero(got)
        assert np.abs(u[chosen]).min() >= np.sort(np.abs(u))[-20]    # the 20 largest
        np.testing.assert_allclose(got[chosen], u[chosen], rtol=2.0 ** -23)   # float32
        np.testing.assert_allclose(new, u - got, rtol=0, atol=1e-9 * np.abs(u).max())
        residual, sent = new, sent + got
    # everything put in is either sent or still in the residual
    np.testing.assert_allclose(sent + residual, np.sum(vs, axis=0), rtol=1e-12,
                               atol=1e-9 * np.abs(vs).max())
    assert codec.nbytes(2000) / parse("none").nbytes(2000) <= 0.0105


def test_qsgd_is_unbiased_seeded_and_bounded():
    codec = parse("qsgd:4")                  # 7 levels: coarse, so bias would show
    v = gradient(50, seed=3)
    norm = np.sqrt(v @ v)
    draws = np.array([decode(codec, encode(codec, v, seed=(9, t, 0))[0], v.size)
                      for t in range(20000)])
    # each coordinate's draw lies within one level of v; its mean within 6 standard
    # errors (a level's spread over the square root of the draws)
    step = norm / 7
    assert np.all(np.abs(draws - v) <= step * (1 + 1e-12))
    np.testing.assert_allclose(draws.mean(axis=0), v, atol=6 * 0.5 * step / np.sqrt(20000))
    again = encode(codec, v, seed=(9, 5, 0))[0]
    assert again == encode(codec, v, seed=(9, 5, 0))[0] != encode(codec, v, seed=(9, 5, 1))[0]
    q8 = parse("qsgd:8")
    assert q8.level_dtype == np.int8 and q8.nbytes(2000) == 8 + 2000
    assert parse("qsgd:9").level_dtype == np.int16
    assert np.array_equal(decode(q8, encode(q8, np.zeros(4))[0], 4), np.zeros(4))


def test_decoders_refuse_what_is_not_an_encoding():
    topk = parse("topk:0.5")
    bad = [
        (parse("none"), b"\x00" * 15, 2, "15 bytes for 2"),
        (parse("fp16"), struct.pack("<d", float("nan")) + b"\x00" * 4, 2, "non-finite"),
        (topk, struct.pack("<I", 3) + b"\x00" * 24, 2, "3 values"),
        (topk, struct.pack("<I2I2f", 2, 1, 1, 1.0, 2.0), 4, "ascending"),
        (topk, struct.pack("<I2I2f", 2, 0, 9, 1.0, 2.0), 4, "ascending within"),
        (topk, b"\x01", 4, "1 bytes"),
        (parse("qsgd:4"), struct.pack("<d", 1.0) + bytes([8, 0]), 2, "outside"),
        (parse("qsgd:4"), struct.pack("<d", -1.0) + bytes([1, 0]), 2, "bad norm"),
    ]
    for codec, data, n, msg in bad:
        with pytest.raises(CodecError, match=msg):
            decode(codec, data, n)
    # random bytes: a CodecError or a vector, never anything else
    rng = np.random.default_rng(0)
    for spec in ("none", "fp16", "topk:0.1", "qsgd:8"):
        codec = parse(spec)
        for _ in range(300):
            n = int(rng.integers(0, 40))
            size = codec.nbytes(n) if rng.random() < 0.5 else int(rng.integers(0, 400))
            try:
                out = decode(codec, rng.bytes(size), n)
            except CodecError:
                continue
            assert out.shape == (n,) and out.dtype == np.float64
