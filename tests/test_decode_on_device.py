"""test.py --decode_on_device: the workers read plain JPEGs without decoding them and the batch's
device decodes them. On the CPU the decoder is stood in for by PIL (torchvision is not installed
here), so the run must write exactly the default run's files; on CUDA, nvJPEG's pixels differ from
libjpeg's and the aligned crops stay within a level on average."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data.image_folder as image_folder
from conftest import ROOT, make_photo_folder
from util.image_io import ImageLoadError, read_plain_jpeg

EXAMPLES = ["000002.jpg", "vd006.png", "trump_hillary.jpg"]  # a PNG among JPEGs: both paths in a batch


def pil_decoder():
    """A stand-in for torchvision's decode_jpeg: libjpeg's pixels through PIL."""
    def decode(datas, device):
        out = []
        for d in datas:
            with Image.open(io.BytesIO(d.numpy().tobytes())) as im:
                out.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).to(device))
        return out

    return decode


def run(standin, folder, out, *extra, device="cpu"):
    import test as test_cli

    return test_cli.main([f"--name={standin['name']}", "--epoch=20", f"--img_folder={folder}", f"--device={device}",
                          f"--bfm_folder={standin['bfm_folder']}", f"--checkpoints_dir={standin['checkpoints_dir']}",
                          "--write_workers=0", f"--results_dir={out}", *extra])


def truncate(path):
    """Cut a file to its first third: a JPEG keeps its header, its data ends early."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 3])


def break_huffman_table(path):
    """Make a JPEG's first Huffman table bogus (its code counts sum far over 256): the header
    still reads and the file still ends with its end marker; decoders refuse the data."""
    data = bytearray(open(path, "rb").read())
    at = data.find(b"\xff\xc4")  # DHT: marker, 2-byte length, class/id, 16 code counts
    assert at > 0
    data[at + 5:at + 21] = b"\xff" * 16
    with open(path, "wb") as f:
        f.write(bytes(data))


def save_jpeg(path, size=(64, 48), **kw):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG", **kw)


def test_read_plain_jpeg_reads_bytes_and_size_without_decoding(tmp_path):
    p = tmp_path / "a.jpg"
    save_jpeg(p, (64, 48))
    data, size = read_plain_jpeg(str(p))
    assert size == (64, 48) and data.dtype == np.uint8 and data.tobytes() == p.read_bytes()


def test_read_plain_jpeg_leaves_other_photos_to_pil(tmp_path):
    """PNG, grayscale JPEG and a JPEG that EXIF says to turn need load_image's normalisation."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("L", (8, 8)).save(tmp_path / "gray.jpg", "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees
    Image.new("RGB", (8, 6)).save(tmp_path / "turned.jpg", "JPEG", exif=exif.tobytes())
    exif[0x0112] = 1
    Image.new("RGB", (8, 6)).save(tmp_path / "upright.jpg", "JPEG", exif=exif.tobytes())
    for name in ("a.png", "gray.jpg", "turned.jpg"):
        assert read_plain_jpeg(str(tmp_path / name)) is None, name
    assert read_plain_jpeg(str(tmp_path / "upright.jpg"))[1] == (8, 6)


def test_read_plain_jpeg_leaves_a_cut_short_jpeg_to_pil(tmp_path):
    """A JPEG without its end marker last (a copy that stopped early) goes to PIL, which says it is
    truncated (nvJPEG would decode it without a word); one with bytes after the marker too."""
    save_jpeg(tmp_path / "a.jpg", (64, 48))
    data = (tmp_path / "a.jpg").read_bytes()
    assert data.endswith(b"\xff\xd9") and read_plain_jpeg(str(tmp_path / "a.jpg")) is not None
    truncate(tmp_path / "a.jpg")
    assert read_plain_jpeg(str(tmp_path / "a.jpg")) is None
    (tmp_path / "b.jpg").write_bytes(data + b"\0\0")
    assert read_plain_jpeg(str(tmp_path / "b.jpg")) is None


def test_read_plain_jpeg_reports_files_that_are_not_images(tmp_path):
    (tmp_path / "text.jpg").write_text("not a photo")
    with pytest.raises(ImageLoadError) as e:
        read_plain_jpeg(str(tmp_path / "text.jpg"))
    assert e.value.reason == "not_an_image"
    with pytest.raises(ImageLoadError) as e:
        read_plain_jpeg(str(tmp_path / "gone.jpg"))
    assert e.value.reason == "missing"


def test_run_decoding_on_the_device_equals_the_default(standin, tmp_path, monkeypatch, one_thread):
    """With the same decoder's pixels, --decode_on_device writes byte-identical files (through
    DataLoader workers, JPEGs and a PNG in the same batches). One CPU thread, as in
    test_inference.py's test_batched_equals_one_at_a_time (on a 32-core host this test failed
    once in two runs while the crops thread also ran on the CPU; never with one thread)."""
    from test_throughput import read_all

    monkeypatch.setattr(image_folder, "torchvision_jpeg_decoder", pil_decoder)
    folder = make_photo_folder(str(tmp_path / "photos"), EXAMPLES)
    for b in (2, 3):  # batches of JPEGs alone and of PNG and JPEGs together (same batches on both sides:
        # the CPU's convolutions round differently for other batch sizes)
        assert run(standin, folder, tmp_path / f"a{b}", "--num_threads=0", f"--batch_size={b}") == 0
        assert run(standin, folder, tmp_path / f"b{b}", "--num_threads=2", f"--batch_size={b}",
                   "--decode_on_device=true") == 0
        a = read_all(tmp_path / f"a{b}")
        assert len(a) == 9 and read_all(tmp_path / f"b{b}") == a  # .obj, .png, .mat of 3 faces


@pytest.mark.parametrize("damage", [break_huffman_table, truncate])
def test_a_jpeg_that_does_not_decode_fails_alone(standin, tmp_path, monkeypatch, capsys, damage):
    """A JPEG whose header reads but whose data is broken is found by the device's decoder (a
    bogus Huffman table), or by PIL in the worker (a file cut short): that face is reported as
    failed with the reason (exit code 1), the others are written."""
    monkeypatch.setattr(image_folder, "torchvision_jpeg_decoder", pil_decoder)
    folder = make_photo_folder(str(tmp_path / "photos"), EXAMPLES)
    broken = os.path.join(folder, "000002.jpg")
    damage(broken)
    assert (read_plain_jpeg(broken) is not None) == (damage is break_huffman_table)  # only then the device's
    out = tmp_path / "out"
    assert run(standin, folder, out, "--num_threads=0", "--batch_size=3", "--decode_on_device=true") == 1
    err = capsys.readouterr()
    reason = "truncated" if damage is truncate else "corrupt"
    assert f"000002.jpg: {reason}" in err.out + err.err
    written = sorted(os.listdir(out))
    assert "000002.mat" not in written
    assert {"vd006.mat", "trump_hillary.mat"} <= set(written)


def test_a_jpeg_decoded_to_another_size_fails_alone(standin, tmp_path, monkeypatch, capsys):
    """A decoder whose image is not the size the header gave (which the alignment used) must not
    be cropped silently: that face fails with the reason."""
    def decoder():
        pil = pil_decoder()
        return lambda datas, device: [img[:, 1:] for img in pil(datas, device)]  # one row short

    monkeypatch.setattr(image_folder, "torchvision_jpeg_decoder", decoder)
    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg", "vd006.png"])
    assert run(standin, folder, tmp_path / "out", "--num_threads=0", "--decode_on_device=true") == 1
    text = "".join(capsys.readouterr())
    assert "000002" in text and "decoded to (3, 593, 423), the header says 3 x 594 x 423" in text
    assert os.path.isfile(tmp_path / "out" / "vd006.mat")


def test_without_torchvision_the_run_says_what_to_install(standin, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(image_folder, "_image_ops_loaded", False)  # as in a process that never loaded them
    monkeypatch.setitem(__import__("sys").modules, "torchvision", None)  # import torchvision raises
    monkeypatch.setitem(__import__("sys").modules, "torchvision.io", None)
    folder = make_photo_folder(str(tmp_path / "photos"), EXAMPLES[:1])
    assert run(standin, folder, tmp_path / "out", "--decode_on_device=true") == 2
    err = capsys.readouterr().err
    assert "--decode_on_device needs torchvision" in err and "pip install torchvision" in err
    assert not (tmp_path / "out").exists()


def _cuda_decoder_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    try:
        image_folder.torchvision_jpeg_decoder()
    except ImportError:
        pytest.skip("needs torchvision")


def test_cuda_crops_decoded_on_the_gpu_stay_near_pils(tmp_path):
    """nvJPEG's pixels are not libjpeg's (its colour upsampling differs): the aligned crops of
    the JPEGs differ by less than a level on average; the PNG's, decoded by PIL either way, not at all."""
    from data.image_folder import AlignedFaces, batch_crops, collate_faces, scan_folder
    from util.preprocess import load_lm3d

    _cuda_decoder_or_skip()
    folder = make_photo_folder(str(tmp_path / "photos"), EXAMPLES + ["015316.jpg", "000114.jpg"])
    entries, _ = scan_folder(folder)
    lm3d = load_lm3d(os.path.join(ROOT, "BFM"))
    a, b = (batch_crops(collate_faces([ds[i] for i in range(len(ds))]), torch.device("cuda"))[1].int()
            for ds in (AlignedFaces(entries, lm3d), AlignedFaces(entries, lm3d, decode_on_device=True)))
    diff = (a - b).abs().flatten(1).float()
    png = [e.name for e in entries].index("vd006")
    assert diff[png].max() == 0
    jpeg = torch.arange(len(entries)) != png
    print(f"crop differences: max {diff[jpeg].max():.0f}, mean {diff[jpeg].mean():.3f} levels")
    assert diff[jpeg].mean() < 1.0 and diff[jpeg].max() < 64


def test_cuda_run_decoding_on_the_gpu(standin, tmp_path):
    _cuda_decoder_or_skip()
    from test_throughput import read_all

    folder = make_photo_folder(str(tmp_path / "photos"), EXAMPLES)
    assert run(standin, folder, tmp_path / "out", "--decode_on_device=true", device="cuda") == 0
    assert len(read_all(tmp_path / "out")) == 9


def test_the_decoder_warms_up_in_its_own_thread_only_on_cuda():
    """``start_decoder_warm_up``: a thread only where the run decodes on a CUDA device; on CUDA
    it ends with the decoder ready (the crops thread waits for it before its first batch)."""
    from pipeline.model import start_decoder_warm_up

    assert start_decoder_warm_up(torch.device("cpu"), decode_on_device=True) is None
    assert start_decoder_warm_up(torch.device("cuda"), decode_on_device=False) is None
    if torch.cuda.is_available():
        _cuda_decoder_or_skip()
        thread = start_decoder_warm_up(torch.device("cuda"), decode_on_device=True)
        assert thread.name == "warm-up-decoder"
        thread.join(timeout=60)
        assert not thread.is_alive()


def test_the_decoder_loads_without_importing_torchvision():
    """Only torchvision's image library is loaded: a fresh process that readies the decoder has
    not imported the torchvision package (whose __init__ costs seconds of start-up)."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("needs torchvision")
    code = ("import sys, torch; from data.image_folder import torchvision_jpeg_decoder as d; d(); "
            "print('torchvision' in sys.modules, hasattr(torch.ops.image, 'decode_jpegs_cuda'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


@pytest.mark.parametrize("damage", [break_huffman_table, truncate])
def test_cuda_a_jpeg_that_does_not_decode_fails_alone(standin, tmp_path, capsys, damage):
    """The same on the GPU with nvJPEG: the broken JPEG fails alone, the others are written.
    (nvJPEG decodes a file cut short without an error; the worker's end-marker check sends it to
    PIL.)"""
    _cuda_decoder_or_skip()
    folder = make_photo_folder(str(tmp_path / "photos"), EXAMPLES)
    damage(os.path.join(folder, "000002.jpg"))
    out = tmp_path / "out"
    assert run(standin, folder, out, "--decode_on_device=true", device="cuda") == 1
    assert f"000002.jpg: {'truncated' if damage is truncate else 'corrupt'}" in "".join(capsys.readouterr())
    written = set(os.listdir(out))
    assert "000002.mat" not in written and {"vd006.mat", "trump_hillary.mat"} <= written
