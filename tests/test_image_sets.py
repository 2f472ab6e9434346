"""pipeline.image_sets / pipeline.confidence: grouping, confidences, aggregation, test.py --group_by."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from scipy.io import loadmat

from conftest import ROOT, golden_lm5
from models.coeffs import COEFFS
from pipeline.confidence import FitConfidence, FitResiduals, load_confidence, fit_residuals
from pipeline.image_sets import GroupRule, aggregate, safe_name

import test as test_cli


def random_coeffs(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, COEFFS.total, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_aggregate_scalar_confidence_is_the_weighted_mean():
    c = random_coeffs(4)
    conf = torch.tensor([1.0, 2.0, 0.5, 0.25], dtype=torch.float64)
    agg = aggregate(c, conf)
    x, w = c.numpy(), conf.numpy() / conf.numpy().sum()
    s = COEFFS.slices()
    assert np.allclose(agg.id.numpy(), (w[:, None] * x[:, s["id"]]).sum(0))
    assert np.allclose(agg.tex.numpy(), (w[:, None] * x[:, s["tex"]]).sum(0))
    assert np.allclose(agg.weights.numpy(), w) and np.isclose(float(agg.weights.sum()), 1.0)


def test_aggregate_vector_confidence_weighs_each_identity_coefficient():
    c = random_coeffs(3, seed=1)
    conf = torch.rand(3, COEFFS.id, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1
    agg = aggregate(c, conf)
    ids = c[:, COEFFS.slices()["id"]].numpy()
    k = 17  # any coefficient: its own weights
    assert np.isclose(float(agg.id[k]), (conf[:, k].numpy() * ids[:, k]).sum() / conf[:, k].numpy().sum())
    w = conf.mean(1).numpy()
    assert np.allclose(agg.weights.numpy(), w / w.sum())


def test_aggregate_of_copies_is_the_copy_and_bad_confidences_are_refused():
    one = random_coeffs(1, seed=3)
    agg = aggregate(one.expand(5, -1), torch.rand(5, dtype=torch.float64) + 0.1)
    assert torch.allclose(agg.id, one[0, COEFFS.slices()["id"]])
    with pytest.raises(ValueError, match="positive"):
        aggregate(random_coeffs(2), torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        aggregate(random_coeffs(2), torch.ones(3, dtype=torch.float64))


def test_fit_confidence_is_one_for_a_perfect_fit_and_decreases_with_each_residual():
    f = FitConfidence(sigma_lm=2.0, sigma_photo=0.1)
    r = FitResiduals(landmark=torch.tensor([0.0, 2.0, 4.0, 0.0, 0.0]), photo=torch.tensor([0.0, 0.0, 0.0, 0.1, 0.2]))
    c = f(None, torch.zeros(5, COEFFS.total), r)
    assert torch.allclose(c, torch.tensor([1.0, 0.5, 0.2, 0.5, 0.2]))


def test_group_rules(tmp_path):
    assert GroupRule.parse("folder").person("alice/a.jpg") == "alice"
    assert GroupRule.parse("folder").person("a.jpg") is None
    csv_path = tmp_path / "people.csv"
    csv_path.write_text("photo,person\na.jpg,Alice\nsub/b.png, Bob \n\n")
    rule = GroupRule.parse(str(csv_path))
    assert (rule.person("a.jpg"), rule.person("sub/b.png"), rule.person("c.jpg")) == ("Alice", "Bob", None)
    (tmp_path / "bad.csv").write_text("a.jpg,Alice\nb.jpg\n")
    with pytest.raises(ValueError, match="line 2"):
        GroupRule.parse(str(tmp_path / "bad.csv"))
    with pytest.raises(ValueError, match="folder"):
        GroupRule.parse(str(tmp_path / "missing.csv"))
    assert safe_name("a/b c") == "a_b_c" and safe_name("..") == "person"


def test_confidence_names_and_a_trained_network(tmp_path):
    r = FitResiduals(landmark=torch.ones(2), photo=torch.ones(2))
    assert torch.equal(load_confidence("uniform")(None, torch.zeros(2, COEFFS.total), r), torch.ones(2))

    class Net(torch.nn.Module):  # a stand-in C-Net: a positive vector over the identity coefficients
        def forward(self, images: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(coeffs[:, :80]) + images.mean() * 0

    path = str(tmp_path / "cnet.pt2")
    batch = torch.export.Dim("batch")
    images = torch.zeros(2, 3, 224, 224)
    torch.export.save(torch.export.export(Net(), (images, torch.zeros(2, COEFFS.total)),
                                          dynamic_shapes=({0: batch}, {0: batch})), path)
    coeffs = random_coeffs(3).float()
    c = load_confidence(path)(torch.zeros(3, 3, 224, 224), coeffs, r)
    assert torch.allclose(c, torch.sigmoid(coeffs[:, :80]))
    (tmp_path / "junk.pt").write_bytes(b"not a network")
    with pytest.raises(ValueError, match="not a network file"):
        load_confidence(str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match="neither"):
        load_confidence("best")


def test_fit_residuals_vanish_on_the_true_coefficients(standin_face_model, one_thread):
    from models.facerecon import FaceReconModel
    from models.renderer import create_renderer
    from data.synthetic import SyntheticConfig, SyntheticFaces

    size = 64  # a small render: the residuals do not depend on the size (landmarks in 224 pixels)
    fm = type(standin_face_model).from_folder(os.path.join(ROOT, "standin", "BFM"), focal=1015.0 * size / 224,
                                              center=size / 2)
    renderer = create_renderer("cpu", focal=1015.0 * size / 224, center=size / 2)
    model = FaceReconModel(torch.nn.Identity(), fm, renderer)
    gen = SyntheticFaces(fm, renderer, SyntheticConfig(noise=0.0, in_range=True))
    b = gen.sample(2, torch.Generator().manual_seed(0))
    exact = fit_residuals(model, b.images, b.coeffs, b.lm68)
    assert float(exact.landmark.max()) < 1e-3 and float(exact.photo.max()) < 0.01
    off = b.coeffs.clone()
    off[:, COEFFS.slices()["trans"]] += 0.05  # ~5 px at 224
    moved = fit_residuals(model, b.images, off, b.lm68[:, :68])
    assert bool((moved.landmark > 3.0).all()) and bool((moved.photo > exact.photo).all())


def person_folder(root: str, layout: dict[str, list[str]]) -> str:
    """Photos copied from examples/ into ``root/<person>/`` (or the top level for person ''),
    with their golden detections where a recursive scan looks for them."""
    from util.detections_io import detection_path, write_points

    lm = golden_lm5()
    for person, names in layout.items():
        os.makedirs(os.path.join(root, person), exist_ok=True)
        for name in names:
            rel = os.path.join(person, name) if person else name
            shutil.copyfile(os.path.join(ROOT, "examples", name), os.path.join(root, rel))
            write_points(detection_path(root, rel), np.array(lm[name]))
    return root


@pytest.mark.slow
def test_group_by_folder_writes_one_aggregate_per_person(standin, standin_face_model, tmp_path, capsys):
    folder = person_folder(str(tmp_path / "people"), {"alice": ["000002.jpg", "015259.jpg"], "bob": ["vd006.png"],
                                                      "": ["JianzhuGuo.jpg"]})
    out = tmp_path / "out"
    code = test_cli.main([f"--name={standin['name']}", "--epoch=20", f"--img_folder={folder}",
                          f"--bfm_folder={standin['bfm_folder']}", f"--checkpoints_dir={standin['checkpoints_dir']}",
                          f"--results_dir={out}", "--num_threads=0", "--save_png=false", "--group_by=folder"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "4 face(s) reconstructed" in text and "2 group(s)" in text and "1 photo(s) in no group" in text
    assert sorted(os.listdir(out / "image_sets")) == ["alice.mat", "alice.obj", "bob.mat", "bob.obj"]
    m = loadmat(str(out / "image_sets" / "alice.mat"))
    assert [str(np.ravel(p)[0]) for p in m["photos"].ravel()] == ["alice/000002.jpg", "alice/015259.jpg"]
    conf = m["confidence"].ravel()
    assert conf.shape == (2,) and np.all((conf > 0) & (conf <= 1))
    assert np.allclose(m["weights"].ravel(), conf / conf.sum(), atol=1e-6)
    # the aggregate from the per-photo .mat files the same run wrote, computed here independently
    ids = np.stack([loadmat(str(out / "alice" / f"{s}.mat"))["id"][0] for s in ("000002", "015259")])
    assert np.allclose(m["id"][0], (conf[:, None] * ids).sum(0) / conf.sum(), atol=1e-5)
    assert not np.allclose(m["id"][0], ids[0])  # both photos count
    b = loadmat(str(out / "image_sets" / "bob.mat"))
    assert np.allclose(b["id"][0], loadmat(str(out / "bob" / "vd006.mat"))["id"][0], atol=1e-6)
    with open(out / "image_sets" / "alice.obj") as f:
        verts = [line for line in f if line.startswith("v ")]
    assert len(verts) == standin_face_model.n_vertex


def test_bad_group_by_or_confidence_is_a_one_line_error(standin, tmp_path, capsys):
    base = [f"--img_folder={tmp_path}", "--device=cpu", f"--name={standin['name']}", "--epoch=20",
            f"--checkpoints_dir={standin['checkpoints_dir']}", f"--bfm_folder={standin['bfm_folder']}"]
    assert test_cli.main(base + [f"--group_by={tmp_path / 'people.csv'}"]) == 2
    assert "people.csv" in capsys.readouterr().err
    assert test_cli.main(base + ["--group_by=folder", "--confidence=best"]) == 2
    assert "--confidence 'best'" in capsys.readouterr().err
    assert test_cli.main(base + ["--group_by=folder", "--skip_existing"]) == 2
    assert "without --skip_existing" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["obj", "ply", "glb"])
def test_a_persons_mesh_honours_the_mesh_format(standin_face_model, tmp_path, fmt):
    """image_sets/<person>.<fmt> (--mesh_format obj|ply|glb, as each photo's mesh) with the .mat
    beside it; read back with trimesh: the aggregated identity's vertices and albedo colours."""
    from types import SimpleNamespace

    from options.feature_options import image_set_settings
    from pipeline.image_sets import PhotoRecord, group_mesh, write_group

    trimesh = pytest.importorskip("trimesh")
    assert image_set_settings(SimpleNamespace(group_by="folder", confidence="fit", mesh_format=fmt)).mesh_format == fmt
    cs = random_coeffs(2).numpy()
    records = [PhotoRecord(f"p/{i}.jpg", cs[i], np.float32(1.0), 1.0, 0.1) for i in range(2)]
    base = str(tmp_path / "alice")
    agg = write_group(base, standin_face_model, records, "uniform", fmt)
    assert sorted(os.listdir(tmp_path)) == sorted(["alice.mat", f"alice.{fmt}"])
    vertex, color = group_mesh(standin_face_model, agg)
    mesh = trimesh.load(f"{base}.{fmt}", process=False, force="mesh")
    np.testing.assert_allclose(mesh.vertices, vertex, atol=1e-5 if fmt != "obj" else 1e-3)
    np.testing.assert_array_equal(np.asarray(mesh.visual.vertex_colors)[:, :3], color)
    assert len(mesh.faces) == len(standin_face_model.face_buf)
    assert np.allclose(loadmat(f"{base}.mat")["id"][0], cs[:, :80].mean(0), atol=1e-5)
