"""Volume I/O: geometry survives NIfTI and NRRD round trips; network axis order is (k, i, j)."""
import numpy as np
import pytest

from MedDiffusionLib.data.volumes import (Volume, check_writable, hu_to_model, model_to_hu, percentile_normalize,
                                          read_volume, write_volume)


def _volume():
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    aff = np.array([[0, -0.8, 0, 10.0], [0.7, 0, 0, -20.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    return Volume(arr, aff)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_round_trip_keeps_values_and_geometry(tmp_path, suffix):
    v = _volume()
    path = write_volume(v, tmp_path / f"v{suffix}")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, v.array)
    np.testing.assert_allclose(back.affine, v.affine, atol=1e-5)
    assert not list(tmp_path.glob(".meddiffusion-*"))
    import os
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_network_order_and_official_writer_geometry():
    dhw = np.random.rand(3, 4, 5).astype(np.float32)  # D=Z, H=X, W=Y
    v = Volume.from_network(dhw, spacing=(1.5, 2.0, 3.0))
    assert v.shape == (4, 5, 3)
    assert v.array[2, 1, 0] == dhw[0, 2, 1]
    np.testing.assert_array_equal(v.affine, np.diag([1.5, 2.0, 3.0, 1.0]))
    np.testing.assert_array_equal(v.to_network(), dhw)
    assert v.spacing == (1.5, 2.0, 3.0)


def test_canonical_reorients_to_ras():
    c = _volume().canonical()
    np.testing.assert_allclose(np.abs(c.affine[:3, :3]), np.diag([0.8, 0.7, 2.5]), atol=1e-9)  # old j (0.8 mm, -R) -> R
    assert (np.diag(c.affine[:3, :3]) > 0).all()
    # the voxel at world point p holds the same value before and after
    v = _volume()
    ijk = np.array([1, 2, 3, 1.0])
    world = v.affine @ ijk
    ijk2 = np.linalg.solve(c.affine, world).round().astype(int)
    assert c.array[tuple(ijk2[:3])] == v.array[1, 2, 3]


def test_existing_and_unwritable_outputs(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="overwrite"):
        check_writable(tmp_path / "a.nii.gz")
    assert check_writable(tmp_path / "a.nii.gz", overwrite=True)
    with pytest.raises(FileNotFoundError):
        check_writable(tmp_path / "missing" / "a.nii.gz")
    with pytest.raises(ValueError, match="unsupported"):
        check_writable(tmp_path / "a.png")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    import os
    if os.geteuid() != 0:  # root ignores directory permissions
        with pytest.raises(PermissionError):
            check_writable(ro / "a.nii.gz")
    ro.chmod(0o700)


def test_intensity_maps():
    arr = np.linspace(-1000, 2000, 1001).astype(np.float32)
    norm, lo, hi = percentile_normalize(arr)
    assert norm.min() == -1 and norm.max() == 1 and lo > -1000 and hi < 2000
    hu = model_to_hu(np.array([-1.0, 0.0, 1.0, 3.0]), -1000, 1000)
    np.testing.assert_allclose(hu, [-1000, 0, 1000, 1000])
    np.testing.assert_allclose(hu_to_model(hu[:3], -1000, 1000), [-1, 0, 1])
    with pytest.raises(ValueError, match="constant"):
        percentile_normalize(np.zeros(10))


def test_check_finite_names_the_bad_voxels():
    from MedDiffusionLib.data.volumes import check_finite
    from MedDiffusionLib.errors import UserError
    arr = np.zeros((4, 4, 4), np.float32)
    check_finite(arr)
    arr[0, 0, :3] = np.nan
    arr[1, 1, 1] = np.inf
    with pytest.raises(UserError, match=r"the CT has 3 NaN and 1 infinite voxel\(s\) out of 64"):
        check_finite(Volume(arr, np.eye(4)), "the CT")


def test_check_ct_intensities_warns_for_mr_and_normalised_images():
    from MedDiffusionLib.data.volumes import check_ct_intensities
    rng = np.random.default_rng(0)
    ct = np.where(rng.random((16, 16, 16)) < 0.4, -1000.0, rng.normal(40, 30, (16, 16, 16))).astype(np.int16)
    assert check_ct_intensities(ct) is None
    mr = rng.integers(0, 256, (16, 16, 16)).astype(np.uint8)
    text = check_ct_intensities(Volume(mr, np.eye(4)))
    assert text is not None and "Hounsfield" in text and "uint8" in text and "\n" not in text
    assert check_ct_intensities(rng.random((8, 8, 8)) * 2 - 1) is not None  # model units, not HU
