"""Sample-quality metrics on constructed feature sets, the reference extractor cache, and the
FID Inception loader (random weights: the file format and the architecture, not the numbers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medivae.data.imageset import ImageSet
from medivae.data.phantoms import make_phantoms
from medivae.evaluation import sample_quality as sq
from medivae.evaluation.features import load_or_fit_reference
from medivae.runtime.errors import UserError


def _gauss(n, d=8, seed=0, shift=0.0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_noise():
    a = _gauss(400)
    assert sq.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(1)
    noise = rng.normal(size=a.shape)
    fds = [sq.frechet_distance(a, a + s * noise) for s in (0.1, 0.3, 1.0, 3.0)]
    assert all(x < y for x, y in zip(fds, fds[1:], strict=False))


def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift():
    a, b = _gauss(4000, d=4, seed=0), _gauss(4000, d=4, seed=1, shift=np.array([2.0, 0, 0, 0]))
    assert sq.frechet_distance(a, b) == pytest.approx(4.0, abs=0.2)


def test_frechet_distance_survives_fewer_points_than_features():
    a, b = _gauss(10, d=32, seed=0), _gauss(10, d=32, seed=1)
    assert np.isfinite(sq.frechet_distance(a, b)) and sq.frechet_distance(a, b) > 0


def test_identical_distributions_score_high_everywhere_and_density_near_one():
    real, fake = _gauss(600, seed=0), _gauss(600, seed=1)
    m = sq.compare(real, fake)
    assert m["precision"] > 0.85 and m["recall"] > 0.85 and m["coverage"] > 0.85
    assert m["density"] == pytest.approx(1.0, abs=0.2)


def test_far_away_samples_have_zero_precision_recall_density_coverage():
    m = sq.compare(_gauss(300, seed=0), _gauss(300, seed=1, shift=50.0))
    assert m == {**m, "precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_mode_dropping_lowers_recall_and_coverage_not_precision():
    rng = np.random.default_rng(0)
    modes = np.array([[0.0] * 4, [20.0] * 4])
    real = np.concatenate([rng.normal(size=(300, 4)) + modes[0], rng.normal(size=(300, 4)) + modes[1]])
    fake = rng.normal(size=(600, 4)) + modes[0]  # covers one of the two modes only
    m = sq.compare(real, fake)
    assert m["precision"] > 0.85
    assert m["recall"] == pytest.approx(0.5, abs=0.08) and m["coverage"] == pytest.approx(0.5, abs=0.08)


def test_with_floor_reports_model_and_floor():
    out = sq.with_floor(_gauss(200), _gauss(100, seed=2, shift=3.0), _gauss(100, seed=3))
    assert out["model"]["fd"] > out["floor"]["fd"]


def _unlabelled(n=48, size=32):
    s = make_phantoms(n, size, seed=5)
    return ImageSet(s.images, np.full(n, -1))


def test_unlabelled_data_gets_an_autoencoder_that_is_saved_and_reused(tmp_path):
    train = _unlabelled()
    ref = load_or_fit_reference(tmp_path, train, {"source": "x"}, epochs=1, width=4, progress=False)
    assert ref.name == "ae" and (ref.folder / "info.json").exists()
    f1 = ref.features(train.images)
    again = load_or_fit_reference(tmp_path, train, {"source": "x"}, epochs=1, width=4, progress=False)
    assert again.folder == ref.folder
    np.testing.assert_allclose(again.features(train.images), f1, rtol=1e-5, atol=1e-6)
    other = load_or_fit_reference(tmp_path, train, {"source": "y"}, epochs=1, width=4, progress=False)
    assert other.folder != ref.folder  # other data, another cache entry


def test_labelled_data_gets_the_classifier(tmp_path):
    train = make_phantoms(40, 32, seed=6)
    ref = load_or_fit_reference(tmp_path, train, {"source": "p"}, epochs=1, width=4, progress=False)
    assert ref.name == "cnn" and ref.content_features(train.images).shape == (40, 128)
    assert ref.features(train.images).shape == (40, 128 + 3 * 16)  # and the detail block: 3 octaves x 4 x 4 cells


def _save_inception(tmp_path):
    from safetensors.torch import save_file

    from medivae.evaluation.inception import FIDInception

    torch.manual_seed(0)
    net = FIDInception().eval()
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    state["fc.weight"] = torch.zeros(1008, 2048)  # present in pytorch-fid's file, ignored here
    torch.save(state, tmp_path / "w.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    return net


def test_fid_inception_loads_its_own_state_dict_in_both_formats(tmp_path):
    from medivae.evaluation.inception import load_fid_inception

    want = _save_inception(tmp_path).state_dict()
    for name in ("w.pth", "w.safetensors"):
        got = load_fid_inception(tmp_path / name).state_dict()
        assert got.keys() == want.keys()
        for k in ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var"):
            assert torch.equal(got[k], want[k])


@pytest.mark.slow
def test_fid_inception_features_are_2048_wide_and_identical_after_reload(tmp_path):
    from medivae.evaluation.inception import inception_features, load_fid_inception

    net = _save_inception(tmp_path)
    imgs = make_phantoms(2, 32, seed=0).images
    ref = inception_features(net, imgs)
    assert ref.shape == (2, 2048)
    again = inception_features(load_fid_inception(tmp_path / "w.pth"), imgs)
    np.testing.assert_allclose(again, ref, rtol=1e-5)


def test_fid_inception_rejects_a_file_that_does_not_fit(tmp_path):
    from medivae.evaluation.inception import load_fid_inception

    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    for name in ("other.pth", "junk.pth", "missing.pth"):
        with pytest.raises(UserError, match="pt_inception"):
            load_fid_inception(tmp_path / name)


def test_duplicates_in_the_real_set_still_count_at_radius_zero():
    """Issue 20: blank slices repeated k+1 times give a k-NN radius of 0; with "<" a generated blank
    slice fell outside every ball, with "<=" it is inside."""
    blank = np.zeros((8, 4))
    real = np.r_[blank, np.random.default_rng(0).normal(size=(20, 4)) + 5]
    assert (sq.knn_radii(real, sq.PR_K)[:8] == 0).all()
    assert sq.precision_recall(real, blank[:6])["precision"] == 1.0  # was 0.0
    assert sq.density_coverage(real, blank[:6])["coverage"] == 8 / 28  # was 0.0


@pytest.mark.parametrize("n, m, d", [(400, 300, 8), (10, 12, 32), (50, 7, 16)])
def test_frechet_distance_equals_the_matrix_square_root_formula(n, m, d):
    """The singular-value route gives what scipy's matrix square root of S_a S_b gives (the textbook formula)."""
    from scipy import linalg

    rng = np.random.default_rng(n + m + d)
    a, b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)), rng.normal(size=(m, d)) + 0.5
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s_a @ s_b).real
    diff = a.mean(0) - b.mean(0)
    want = diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root)
    assert sq.frechet_distance(a, b) == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_sample_quality_intervals_contain_the_estimates_and_repeat_with_the_seed():
    real, fake = _gauss(300, seed=0), _gauss(200, seed=1, shift=0.3)
    point = sq.compare(real, fake)
    ci = sq.compare_ci(real, fake, 300, seed=7)
    assert set(ci) == set(point)
    for name, (lo, hi) in ci.items():
        assert lo <= point[name] <= hi and lo < hi, name
    assert sq.compare_ci(real, fake, 300, seed=7) == ci
    assert sq.compare_ci(real, fake, 300, seed=8) != ci
    assert sq.compare_ci(real, fake, 0) == {}


def test_per_point_memberships_average_to_the_metrics():
    real, fake = _gauss(250, seed=2), _gauss(180, seed=3, shift=0.5)
    point, per = sq.compare(real, fake), sq.per_point(real, fake)
    assert len(per["precision"]) == len(per["density"]) == 180 and len(per["recall"]) == 250
    for name, v in per.items():
        assert v.mean() == pytest.approx(point[name]), name


def test_sample_quality_intervals_are_wider_with_fewer_samples():
    # 4 dimensions and a shift: no metric saturates at 0 or 1 (a saturated one has a zero-width interval)
    big = sq.compare_ci(_gauss(800, d=4, seed=0), _gauss(800, d=4, seed=1, shift=0.6), 200, seed=0)
    small = sq.compare_ci(_gauss(80, d=4, seed=0), _gauss(80, d=4, seed=1, shift=0.6), 200, seed=0)
    for name in big:
        assert small[name][1] - small[name][0] > big[name][1] - big[name][0], name


def test_fd_interval_separates_a_shifted_set_from_a_matching_one():
    real = _gauss(500, d=4, seed=0)
    same = sq.compare_ci(real, _gauss(500, d=4, seed=1), 200)["fd"]
    far = sq.compare_ci(real, _gauss(500, d=4, seed=1, shift=1.0), 200)["fd"]  # true FD 4
    assert same[1] < far[0] and far[0] < 4.0 < far[1] + 0.5
