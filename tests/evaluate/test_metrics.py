"""Fusion metrics: hand-computed cases, properties, conventions, and the published SDNet row."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluate import metrics as M
from pipeline.data.images import read_gray
from pipeline.evaluate.score import evaluate_folder
from conftest import shared_dataset, shared_file

# CDDFuse's published TNO row for SDNet (EN, SD, SF, MI, SCD, VIF, Qabf, SSIM).
PUBLISHED_SDNET = {"EN": 6.64, "SD": 32.66, "SF": 12.05, "MI": 1.52, "SCD": 1.49, "VIF": 0.56, "Qabf": 0.44, "SSIM": 1.00}
METHODS = ("DenseFuse", "SDNet", "SeAFusion", "U2Fusion")


def _textured(h: int = 64, w: int = 80, seed: int = 0) -> np.ndarray:
    """A 0-255 integer-valued image with smooth structure and noise (float64)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 120 + 50 * np.sin(xx / 5.0 + seed) * np.cos(yy / 7.0) + rng.normal(0, 10, (h, w))
    return np.clip(np.round(img), 0, 255)


@pytest.fixture(scope="module")
def triplet() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b = _textured(seed=1), _textured(seed=2)
    return a, b, np.round((a + b) / 2)


def _tno_names() -> list[str]:
    listing = shared_file("data", "TNO", "subset_CDDFuse_test25.txt")
    names = []
    for line in listing.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            _cddfuse_name, ours = line.split()
            names.append(ours)
    assert len(names) == 25
    return names


# ---------------------------------------------------------------- hand-computed cases


def test_en_hand_computed() -> None:
    two_levels = np.zeros((8, 8))
    two_levels[:, 4:] = 200
    assert M.en(None, None, two_levels) == pytest.approx(1.0)
    assert M.en(None, None, np.full((5, 7), 37.0)) == 0.0
    all_levels = np.arange(256, dtype=float).reshape(16, 16)
    assert M.en(None, None, all_levels) == pytest.approx(8.0)
    four_levels = np.repeat([0.0, 1.0, 2.0, 3.0], 2).reshape(2, 4) + 0.2  # rounded to 4 equiprobable levels
    assert M.en(None, None, four_levels) == pytest.approx(2.0)


def test_sd_sf_ag_of_ramps() -> None:
    assert M.sd(None, None, np.array([[0.0, 2.0], [0.0, 2.0]])) == pytest.approx(1.0)  # population SD
    yy, xx = np.mgrid[0:20, 0:30].astype(float)
    ramp = 3.0 * xx  # dx = 3 everywhere, dy = 0
    assert M.sf(None, None, ramp) == pytest.approx(3.0)
    assert M.ag(None, None, ramp) == pytest.approx(3.0 / math.sqrt(2.0))
    plane = 3.0 * xx + 4.0 * yy  # gradients exact at the borders too (one-sided differences of a plane)
    assert M.sf(None, None, plane) == pytest.approx(5.0)
    assert M.ag(None, None, plane) == pytest.approx(math.sqrt((9.0 + 16.0) / 2.0))
    checker = (np.indices((10, 10)).sum(axis=0) % 2) * 10.0  # neighbours differ by 10 both ways
    assert M.sf(None, None, checker) == pytest.approx(math.sqrt(200.0))


def test_mi_of_image_with_itself_is_its_entropy_in_nats(triplet) -> None:
    a, _, _ = triplet
    en_bits = M.en(None, None, a)
    assert M.mutual_information(a, a) == pytest.approx(en_bits * math.log(2.0))
    two = np.zeros((4, 4))
    two[:2] = 255
    assert M.mutual_information(two, two) == pytest.approx(math.log(2.0))
    assert M.mi(two, two, two) == pytest.approx(2 * math.log(2.0))  # summed over the two sources


@pytest.mark.filterwarnings("ignore:Clustering metrics expects discrete values")
def test_mi_matches_sklearn_and_is_symmetric() -> None:
    from sklearn.metrics import mutual_info_score

    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (40, 50)).astype(float)
    y = np.clip(x + rng.integers(-30, 31, x.shape), 0, 255)
    assert M.mutual_information(x, y) == pytest.approx(mutual_info_score(x.ravel(), y.ravel()), rel=1e-12)
    assert M.mutual_information(x, y) == pytest.approx(M.mutual_information(y, x), rel=1e-12)
    # non-integer values take the general path: still one label per distinct value
    xf, yf = x / 7.0, np.sqrt(y) + 300.0
    assert M.mutual_information(xf, yf) == pytest.approx(mutual_info_score(xf.ravel(), yf.ravel()), rel=1e-12)
    a, b = x, rng.integers(0, 256, x.shape).astype(float)
    assert M.mi(a, b, y) == pytest.approx(M.mi(b, a, y), rel=1e-12)
    assert M.mutual_information(x, np.full_like(x, 9.0)) == 0.0


def test_cc_scd_psnr_hand_computed(triplet) -> None:
    a, b, _ = triplet
    assert M.cc(a, a, a) == pytest.approx(1.0)
    assert M.cc(a, a, 255.0 - a) == pytest.approx(-1.0)
    assert M.cc(a, a, 2.0 * a + 5.0) == pytest.approx(1.0)  # invariant to gain and offset
    assert M.scd(a, b, a + b) == pytest.approx(2.0)  # F - B = A and F - A = B
    f = np.array([[10.0, 20.0], [30.0, 40.0]])
    # MSE against A = F + 2 is 4, against B = F - 4 is 16: mean 10; peak max(F)^2 = 1600
    assert M.psnr(f + 2.0, f - 4.0, f) == pytest.approx(10.0 * math.log10(1600.0 / 10.0))
    assert M.psnr(f, f, f) == math.inf


# ---------------------------------------------------------------- conventions vs scipy / scikit-image


def test_vif_window_and_valid_filtering_match_matlab_and_scipy() -> None:
    from scipy.signal import convolve2d

    for n in (17, 9, 5, 3):
        sd = n / 5.0
        m = (n - 1) / 2.0
        y, x = np.ogrid[-m : m + 1, -m : m + 1]
        h = np.exp(-(x * x + y * y) / (2.0 * sd * sd))  # MATLAB fspecial('gaussian', n, n/5)
        h[h < np.finfo(h.dtype).eps * h.max()] = 0
        win = h / h.sum()
        w1 = M.gaussian_window_1d(n)
        np.testing.assert_allclose(np.outer(w1, w1), win, rtol=1e-12, atol=1e-15)
        img = _textured(41, 37, seed=n)
        ref = convolve2d(img, np.rot90(win, 2), mode="valid")
        np.testing.assert_allclose(M._filter_valid(img, w1), ref, rtol=1e-10, atol=1e-9)


def test_sobel_matches_scipy_same_convolution() -> None:
    from scipy.signal import convolve2d

    img = _textured(23, 31, seed=4)
    g, alpha = M.sobel_gradients(img)
    sx = convolve2d(img, np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], float), mode="same")
    sy = convolve2d(img, np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], float), mode="same")
    np.testing.assert_allclose(g, np.sqrt(sx**2 + sy**2), rtol=1e-12, atol=1e-9)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.where(sx == 0, np.pi / 2, np.arctan(sy / sx))
    np.testing.assert_allclose(alpha, expected, rtol=1e-12, atol=1e-12)
    flat = np.full((5, 5), 7.0)
    _, a_flat = M.sobel_gradients(flat)
    assert a_flat[2, 2] == pytest.approx(np.pi / 2)  # Sx = 0 -> pi/2


@pytest.mark.parametrize("seed", [0, 1])
def test_ssim_matches_scikit_image_with_data_range_2(seed: int) -> None:
    from skimage.metrics import structural_similarity

    x = _textured(50, 61, seed=seed)
    y = np.clip(x + np.random.default_rng(seed).normal(0, 15, x.shape), 0, 255).round()
    y[10:20, 10:30] = 80.0  # flat patch: where data_range=2 matters most
    x[10:20, 10:30] = 81.0
    ref = structural_similarity(x, y, data_range=2)
    assert M.ssim_single(x, y) == pytest.approx(ref, rel=1e-9, abs=1e-9)
    assert M.ssim_single(x, y, data_range=255) == pytest.approx(structural_similarity(x, y, data_range=255), rel=1e-9)
    assert M.ssim(x, y, x) == pytest.approx(1.0 + ref, rel=1e-9)


# ---------------------------------------------------------------- properties


def test_constant_image_properties() -> None:
    const = np.full((40, 40), 90.0)
    assert M.en(None, None, const) == 0.0
    assert M.sd(None, None, const) == 0.0
    assert M.sf(None, None, const) == 0.0
    assert M.ag(None, None, const) == 0.0
    # VIF of a constant reference is 0/0, defined as 1.0 by the reference evaluator
    assert M.vif_single(const, _textured(40, 40)) == 1.0


def test_identical_images(triplet) -> None:
    a, _, _ = triplet
    assert M.ssim(a, a, a) == pytest.approx(2.0)  # each of the two summed parts is 1
    assert M.ssim_single(a, a) == pytest.approx(1.0)
    assert M.vif_single(a, a) == pytest.approx(1.0, abs=1e-8)
    assert M.vif(a, a, a) == pytest.approx(2.0, abs=1e-8)
    assert M.cc(a, a, a) == pytest.approx(1.0)
    assert math.isnan(M.scd(a, a, a))  # F - B is constant: its correlation is undefined


def test_qabf_of_a_source_with_itself_under_the_quirk(triplet) -> None:
    a, b, f = triplet
    # integer 0-255 image: every non-zero Sobel magnitude is >= 1, the sigmoid is saturated
    low = 0.9994 / (1 + math.exp(-15 * 0.5)) * 0.9879 / (1 + math.exp(-22 * 0.2))  # all magnitudes 1
    high = 0.9994 * 0.9879 / (1 + math.exp(-22 * 0.2))  # strong edges
    q = M.qabf(a, a, a)
    assert low - 1e-12 <= q <= high + 1e-12
    assert q == pytest.approx(0.9753, abs=6e-4)
    # the quirk: equal magnitudes give the ratio gF (not 1), so the score of perfectly preserved
    # edges depends on their strength: it collapses once the Sobel magnitudes fall below Dg = 0.5
    # (without the quirk the ratio would be 1 and every scale would score q)
    scores = [M.qabf(k * a, k * a, k * a) for k in (1.0, 0.1, 0.01, 0.001, 0.0002)]
    assert scores == sorted(scores, reverse=True)
    assert scores[1] == pytest.approx(q, abs=0.01) and scores[2] < 0.9 and scores[-1] < 0.01
    # a black fused image has no gradient at all (even at the zero-padded borders): no edge kept
    assert M.qabf(a, b, np.zeros_like(f)) < 0.01
    assert 0.0 < M.qabf(a, b, f) < q


def test_vif_drops_with_noise_and_blur(triplet) -> None:
    import cv2

    a, _, _ = triplet
    big = _textured(96, 96, seed=7)
    noisy = big + np.random.default_rng(0).normal(0, 20, big.shape)
    blurred = cv2.GaussianBlur(big, (0, 0), 2.0)
    assert 0.0 < M.vif_single(big, noisy) < 0.9
    assert 0.0 < M.vif_single(big, blurred) < 0.9
    assert M.vif_single(big, big) > M.vif_single(big, noisy)


def test_ranges_on_random_images() -> None:
    rng = np.random.default_rng(11)
    for _ in range(3):
        a, b, f = (rng.integers(0, 256, (48, 52)).astype(float) for _ in range(3))
        r = M.compute_all(a, b, f)
        assert list(r) == list(M.METRICS)
        assert 0 <= r["EN"] <= 8 and r["SD"] >= 0 and r["SF"] >= 0 and r["AG"] >= 0 and r["MI"] >= 0
        assert -2 <= r["SCD"] <= 2 and -1 <= r["CC"] <= 1 and -2 <= r["SSIM"] <= 2
        assert 0 <= r["Qabf"] <= 1 and r["VIF"] >= 0
        assert all(math.isfinite(v) for v in r.values())


def test_compute_all_rejects_bad_input(triplet) -> None:
    a, b, f = triplet
    with pytest.raises(ValueError, match="sizes differ"):
        M.compute_all(a, b, f[:-1])
    with pytest.raises(ValueError, match="gray"):
        M.compute_all(a, b, np.dstack([f, f, f]))
    with pytest.raises(ValueError, match="33x33"):
        M.compute_all(a[:20, :20], b[:20, :20], f[:20, :20])
    r = M.compute_all(a.astype(np.uint8), b.astype(np.uint8), f.astype(np.uint8))  # any real dtype
    assert r == pytest.approx(M.compute_all(a, b, f))


# ---------------------------------------------------------------- published numbers (real data)


def test_reproduces_cddfuse_published_sdnet_row() -> None:
    """Means over the 25 TNO test pairs of the SDNet images match CDDFuse's table within 0.02."""
    tno = shared_dataset("TNO")
    names = _tno_names()
    fused_dir = shared_file("reference", "TNO_fused", "SDNet")
    assert sorted(p.name for p in fused_dir.glob("*.png")) == sorted(names)  # named as the TNO pairs
    df = evaluate_folder(tno / "ir", tno / "vi", fused_dir, parallel=False)
    assert list(df.columns) == ["name", *M.METRICS, *M.DIAGNOSTICS]
    assert len(df) == 25 and df.attrs["skipped"] == []
    means = df[list(M.METRICS)].mean()
    for name, published in PUBLISHED_SDNET.items():
        assert means[name] == pytest.approx(published, abs=0.02), name


@pytest.fixture(scope="module")
def cheap_means() -> dict[str, dict[str, float]]:
    """Means of the fast single-image metrics and MI for each method over the 25 pairs."""
    tno = shared_dataset("TNO")
    names = _tno_names()
    out: dict[str, dict[str, float]] = {}
    sources = {n: (read_gray(tno / "ir" / n), read_gray(tno / "vi" / n)) for n in names}
    for method in METHODS:
        folder = shared_file("reference", "TNO_fused", method)
        rows = []
        for n in names:
            a, b = sources[n]
            f = read_gray(folder / n).astype(float)
            rows.append({k: M.METRIC_FUNCTIONS[k](a, b, f) for k in ("EN", "SD", "SF", "AG", "MI", "CC")})
        out[method] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return out


def test_published_methods_ranges_and_ordering(cheap_means) -> None:
    for method, m in cheap_means.items():
        assert 5.5 < m["EN"] < 8.0, method
        assert 15.0 < m["SD"] < 60.0, method
        assert 0.5 < m["MI"] < 4.0, method  # nats, summed over two sources
        assert 0.2 < m["CC"] < 1.0, method
        assert 0.0 < m["AG"] < m["SF"], method  # AG halves the differences and averages the gradients
    # SeAFusion (the newest of the four) leads on information and contrast, as in its paper;
    # DenseFuse (an averaging auto-encoder) is the blurriest.
    for k in ("EN", "SD", "SF", "AG", "MI"):
        assert max(cheap_means, key=lambda meth: cheap_means[meth][k]) == "SeAFusion", k
    for k in ("SF", "AG"):
        assert min(cheap_means, key=lambda meth: cheap_means[meth][k]) == "DenseFuse", k


def test_full_metrics_on_one_published_image_of_each_method() -> None:
    tno = shared_dataset("TNO")
    name = _tno_names()[0]
    a, b = read_gray(tno / "ir" / name), read_gray(tno / "vi" / name)
    for method in METHODS:
        r = M.compute_all(a, b, read_gray(shared_file("reference", "TNO_fused", method, name)))
        assert 0.2 < r["VIF"] < 1.5 and 0.2 < r["Qabf"] < 0.8, method
        assert 0.5 < r["SSIM"] < 1.5 and 8 < r["PSNR"] < 30, method


def test_brightness_gaps_measure_darkened_and_kept_regions():
    """VIgap/IRgap: mean of F - max(A, B) where one input is >= 60 levels brighter (issue 20)."""
    ir = np.full((40, 40), 20.0)
    ir[:, 30:] = 220.0  # a warm target, dark in the visible image
    vi = np.full((40, 40), 200.0)
    vi[:, 20:] = 10.0
    fused = np.maximum(ir, vi)
    fused[:, :10] -= 79.0  # half the sky darkened by 79 levels
    gaps = M.brightness_gaps(ir, vi, fused)
    assert gaps["VIgap"] == pytest.approx(-39.5) and gaps["IRgap"] == pytest.approx(0.0)
    assert np.isnan(M.brightness_gaps(vi, vi, vi)["VIgap"])  # no such pixel: undefined, not 0
