"""Calibration/evaluation data loading: formats, seeded sampling, validation (no TensorFlow)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgeq.calibration import DataOptions, InputSpec, load_dataset, parse_floats
from edgeq.errors import DataError, UsageError

IMAGE = [InputSpec("image", (None, 8, 8, 1), "float32")]
TWO = [InputSpec("image", (None, 8, 8, 1), "float32"), InputSpec("extra", (None, 4), "float32")]


def _x(n: int = 50) -> np.ndarray:
    return np.random.default_rng(1).random((n, 8, 8, 1), dtype=np.float32)


def test_npy_draws_seeded_reproducible_samples(tmp_path):
    np.save(tmp_path / "c.npy", _x(500))
    a = load_dataset(tmp_path / "c.npy", IMAGE, DataOptions(samples=200, seed=3))
    b = load_dataset(tmp_path / "c.npy", IMAGE, DataOptions(samples=200, seed=3))
    c = load_dataset(tmp_path / "c.npy", IMAGE, DataOptions(samples=200, seed=4))
    assert len(a) == 200 and a.available == 500
    assert a.indices == b.indices and a.indices != c.indices
    np.testing.assert_array_equal(a.arrays[0], b.arrays[0])
    assert a.sample(0)["image"].shape == (1, 8, 8, 1)
    assert not a.arrays[0].flags.writeable


def test_fewer_samples_than_asked_takes_all_in_order(tmp_path):
    x = _x(30)
    np.save(tmp_path / "c.npy", x)
    d = load_dataset(tmp_path / "c.npy", IMAGE, DataOptions(samples=200))
    assert len(d) == 30
    np.testing.assert_array_equal(d.arrays[0], x)


def test_float64_and_uint8_are_cast_to_the_model_dtype(tmp_path):
    np.save(tmp_path / "f64.npy", _x(5).astype(np.float64))
    np.save(tmp_path / "u8.npy", (_x(5) * 255).astype(np.uint8))
    assert load_dataset(tmp_path / "f64.npy", IMAGE).arrays[0].dtype == np.float32
    assert load_dataset(tmp_path / "u8.npy", IMAGE).arrays[0].dtype == np.float32


def test_npz_with_x_and_labels(tmp_path):
    np.savez(tmp_path / "e.npz", x=_x(40), y=np.arange(40) % 10)
    d = load_dataset(tmp_path / "e.npz", IMAGE, DataOptions(samples=None))
    assert len(d) == 40 and d.labels is not None and list(d.labels[:3]) == [0, 1, 2]


def test_npz_labels_follow_the_drawn_samples(tmp_path):
    x = _x(100)
    np.savez(tmp_path / "e.npz", x=x, y=np.arange(100))
    d = load_dataset(tmp_path / "e.npz", IMAGE, DataOptions(samples=10, seed=0))
    for k, i in enumerate(d.indices):
        assert d.labels[k] == i
        np.testing.assert_array_equal(d.arrays[0][k], x[i])


def test_npz_multi_input_by_name(tmp_path):
    np.savez(tmp_path / "m.npz", image=_x(20), extra=np.ones((20, 4), np.float32))
    d = load_dataset(tmp_path / "m.npz", TWO, DataOptions(samples=5))
    assert d.names == ("image", "extra")
    assert d.sample(2)["extra"].shape == (1, 4)


def test_npz_multi_input_missing_array_names_what_is_expected(tmp_path):
    np.savez(tmp_path / "m.npz", image=_x(20))
    with pytest.raises(DataError, match=r"expected arrays 'image', 'extra'.*found image"):
        load_dataset(tmp_path / "m.npz", TWO)


def test_npy_for_a_multi_input_model_says_use_npz(tmp_path):
    np.save(tmp_path / "c.npy", _x(5))
    with pytest.raises(DataError, match=r"2 inputs \(image, extra\).*\.npz"):
        load_dataset(tmp_path / "c.npy", TWO)


def test_wrong_rank_says_expected_and_got(tmp_path):
    np.save(tmp_path / "c.npy", _x(5)[..., 0])
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path / "c.npy", IMAGE)
    msg = str(err.value)
    assert "expected samples of shape (8, 8, 1) (rank 3), got (8, 8) (rank 2)" in msg
    assert "x[..., None]" in msg


def test_wrong_shape_says_expected_and_got(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((5, 28, 28, 1), np.float32))
    with pytest.raises(DataError, match=r"expected samples of shape \(8, 8, 1\).*got \(28, 28, 1\)"):
        load_dataset(tmp_path / "c.npy", IMAGE)


def test_unsafe_dtype_is_refused(tmp_path):
    np.save(tmp_path / "c.npy", _x(5).astype(np.complex64))
    with pytest.raises(DataError, match="dtype complex64 cannot be safely cast to the model's input dtype float32"):
        load_dataset(tmp_path / "c.npy", IMAGE)


def test_float_data_for_an_integer_input_is_refused(tmp_path):
    np.save(tmp_path / "c.npy", np.full((5, 4), 0.5))
    with pytest.raises(DataError, match="float64 cannot be safely cast.*int32"):
        load_dataset(tmp_path / "c.npy", [InputSpec("tokens", (None, 4), "int32")])


def test_nan_and_inf_are_refused_with_the_sample(tmp_path):
    x = _x(10)
    x[7, 0, 0, 0] = np.nan
    x[8, 1, 1, 0] = np.inf
    np.save(tmp_path / "c.npy", x)
    with pytest.raises(DataError, match=r"1 NaN and 1 Inf values \(first in sample 7\)"):
        load_dataset(tmp_path / "c.npy", IMAGE, DataOptions(samples=None))


def test_float64_overflowing_float32_is_reported_as_inf(tmp_path):
    x = _x(3).astype(np.float64)
    x[1, 0, 0, 0] = 1e300
    np.save(tmp_path / "c.npy", x)
    with pytest.raises(DataError, match="Inf"):
        load_dataset(tmp_path / "c.npy", IMAGE)


def test_empty_set_is_refused(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((0, 8, 8, 1), np.float32))
    with pytest.raises(DataError, match="holds no samples"):
        load_dataset(tmp_path / "c.npy", IMAGE)


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "nope.npy", IMAGE)
    (tmp_path / "c.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="unknown format '.csv'"):
        load_dataset(tmp_path / "c.csv", IMAGE)
    (tmp_path / "bad.npy").write_text("not numpy")
    with pytest.raises(DataError, match="not a readable NumPy file"):
        load_dataset(tmp_path / "bad.npy", IMAGE)


def test_image_directory_is_resized_normalised_and_labelled(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = load_dataset(tmp_path, IMAGE, DataOptions(scale=1 / 255))
    assert d.kind == "images" and len(d) == 6
    assert d.arrays[0].shape == (6, 8, 8, 1)
    assert 0.0 <= d.arrays[0].min() and d.arrays[0].max() <= 1.0
    assert sorted(d.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    rgb = load_dataset(tmp_path, [InputSpec("img", (None, 4, 4, 3))], DataOptions(mean=(127.5,), std=(127.5,)))
    assert rgb.arrays[0].shape == (6, 4, 4, 3) and rgb.arrays[0].min() >= -1.0


def test_empty_image_directory(tmp_path):
    with pytest.raises(DataError, match="holds no samples"):
        load_dataset(tmp_path, IMAGE)


def test_module_function_source(tmp_path, monkeypatch):
    (tmp_path / "mydata_edgeq.py").write_text(textwrap.dedent("""
        import numpy as np
        def samples():
            for i in range(12):
                yield {"image": np.full((1, 8, 8, 1), i, np.float32), "extra": np.zeros(4), "y": i % 3}
        def bad():
            return 5
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    d = load_dataset("mydata_edgeq:samples", TWO, DataOptions(samples=5, seed=1))
    assert len(d) == 5 and d.arrays[0].shape == (5, 8, 8, 1) and d.labels is not None
    assert d.arrays[1].dtype == np.float32
    with pytest.raises(DataError, match="must return an iterable"):
        load_dataset("mydata_edgeq:bad", TWO)
    with pytest.raises(DataError, match="has no function 'nothing'"):
        load_dataset("mydata_edgeq:nothing", TWO)
    with pytest.raises(DataError, match="cannot import module"):
        load_dataset("no_such_module_edgeq:fn", TWO)
    sys.modules.pop("mydata_edgeq", None)


def test_options_are_checked():
    with pytest.raises(UsageError, match="either --scale or --mean/--std"):
        DataOptions(scale=1.0, mean=(0.5,))
    with pytest.raises(UsageError, match="--std must not be 0"):
        DataOptions(std=(0.0,))
    assert parse_floats("0.485, 0.456,0.406", "--mean") == (0.485, 0.456, 0.406)
    with pytest.raises(UsageError, match="--mean takes numbers"):
        parse_floats("a,b", "--mean")


def test_mean_std_channel_count_must_match(tmp_path):
    np.save(tmp_path / "c.npy", _x(5))
    with pytest.raises(DataError, match="--mean has 3 values but input 'image' has 1 channels"):
        load_dataset(tmp_path / "c.npy", IMAGE, DataOptions(mean=(1.0, 2.0, 3.0), std=(1.0,)))


# ------------------------------------------------ images from elsewhere: bounded decoding


def _png_header_only(path, width: int, height: int) -> None:
    """A 57-byte PNG that declares width x height pixels (IHDR + IEND, no image data)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_image_over_pillows_bomb_guard_is_a_data_error(tmp_path, ledger):
    _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)  # 10 Gpx: Pillow raises DecompressionBombError
    with pytest.raises(DataError, match=r"bomb\.png: .*(decompression|more than 64 Mpx)"):
        load_dataset(tmp_path, IMAGE)
    ledger("bad_input", "calibration image tripping Pillow's decompression-bomb guard")


def test_real_81_megapixel_image_is_refused_before_decoding(tmp_path, ledger):
    """Below Pillow's own limit (89 Mpx) but far above any model input: refused from its header."""
    from PIL import Image

    Image.new("1", (9000, 9000)).save(tmp_path / "huge.png")  # a few KB on disk, 81 Mpx decoded
    assert (tmp_path / "huge.png").stat().st_size < 100_000
    with pytest.raises(DataError, match=r"huge\.png: the image is 9000 x 9000 pixels, more than 64 Mpx"):
        load_dataset(tmp_path, IMAGE)
    ledger("bad_input", "calibration image of 81 Mpx in a few KB")


def test_truncated_and_garbage_images_name_the_file(tmp_path, ledger):
    from PIL import Image

    truncated, garbage = tmp_path / "t", tmp_path / "g"
    truncated.mkdir()
    garbage.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(truncated / "a.jpg")
    data = (truncated / "a.jpg").read_bytes()
    (truncated / "a.jpg").write_bytes(data[: len(data) // 3])
    (garbage / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(DataError, match=r"a\.jpg: cannot read image"):
        load_dataset(truncated, IMAGE)
    with pytest.raises(DataError, match=r"b\.png: cannot read image"):
        load_dataset(garbage, IMAGE)
    ledger("bad_input", "truncated or garbage calibration image")


@pytest.mark.slow
def test_convert_cli_with_a_bomb_in_the_image_folder_is_one_line(tmp_path, digits_keras, ledger):
    from click.testing import CliRunner

    from edgeq.cli import main

    _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    res = CliRunner().invoke(main, ["convert", str(digits_keras), "--calib", str(tmp_path), "-o",
                                    str(tmp_path / "out.tflite")])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: calibration data ") and "bomb.png" in lines[0]
    assert not (tmp_path / "out.tflite").exists()
    ledger("bad_input", "edgeq convert --calib with a decompression bomb")


def _npy_bytes(shape, payload: bytes = b"\0" * 64) -> bytes:
    import io

    from numpy.lib import format as npy_format

    b = io.BytesIO()
    npy_format.write_array_header_1_0(b, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return b.getvalue() + payload


@pytest.mark.parametrize("kind", ["npy", "npz"])
def test_header_declaring_233_tib_is_a_data_error(tmp_path, kind, ledger):
    """A 200-byte file whose header declares 10^12 samples: refused before numpy allocates 233 TiB."""
    import zipfile

    data = _npy_bytes((10**12, 8, 8, 1))
    if kind == "npy":
        path = tmp_path / "huge.npy"
        path.write_bytes(data)
    else:
        path = tmp_path / "huge.npz"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x.npy", data)
    with pytest.raises(DataError, match=r"huge\.np[yz]: .*declares 256000000000000 bytes but .*holds 64"):
        load_dataset(path, IMAGE)
    ledger("bad_input", f"calibration .{kind} whose header declares 233 TiB")


def test_npz_zip_bomb_is_a_data_error(tmp_path, ledger):
    import zipfile

    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            f.write(_npy_bytes((300 * 1024 * 1024 // 256, 8, 8, 1), b""))
            chunk = b"\0" * (1 << 20)
            for _ in range(300):
                f.write(chunk)
    assert path.stat().st_size < 1_000_000
    with pytest.raises(DataError, match=r"bomb\.npz: array 'x' expands from \d+ to \d+ bytes \(a zip bomb\?\)"):
        load_dataset(path, IMAGE)
    ledger("bad_input", "calibration .npz zip bomb (300 MiB of zeros in under 1 MB)")


@pytest.mark.parametrize("option, text", [("--mean", "nan"), ("--std", "1,inf,1"), ("--mean", "1e999"),
                                          ("--std", "0.5,0,0.5")])
def test_mean_and_std_must_be_finite_and_std_nonzero(option, text, ledger):
    with pytest.raises(UsageError, match=rf"{option} (takes finite numbers|cannot be 0)"):
        parse_floats(text, option)
    ledger("bad_input", f"calibration {option} {text}")


def test_package_imports_numpy_only_and_exports_its_public_names():
    """``edgeq.calibration`` (every module of it) loads no TensorFlow, PyTorch or Pillow: check, deploy and the
    CLI import it. Its ``__all__`` names what importers use."""
    code = (
        "import sys, edgeq.calibration as c\n"
        "from edgeq.calibration import dataset, functions, options, readers, sampling, types\n"
        "missing = [n for n in c.__all__ if not hasattr(c, n)]\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'tf_keras', 'torch', 'PIL') if m in sys.modules]\n"
        "print('MISSING=' + ','.join(missing) + ' HEAVY=' + ','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "MISSING= HEAVY="
    import edgeq.calibration as c

    assert {"DataOptions", "Dataset", "InputSpec", "load_dataset", "iter_samples", "parse_floats", "parse_input_shape",
            "concrete_inputs", "import_function", "check_numpy_sizes"} <= set(c.__all__)
