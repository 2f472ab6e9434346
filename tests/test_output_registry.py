"""The output registry (pipeline.outputs): one entry per output, read by every stage."""
import os

import numpy as np
import pytest
import torch

from conftest import make_photo_folder

DEFAULT_OUTPUTS = ["png", "mesh", "mat", "texture", "report"]


def mean_depth_files(cfg, res, base: str) -> list[tuple[str, list]]:
    """The toy output's file: the face's mean world-space z and its made array's value."""
    from util.results_io import world_vertices

    z = float(world_vertices(cfg, res)[:, 2].mean())
    return [(base + "_depth.txt", [f"{z:.6f} {float(res.arrays['max_depth']):.6f}\n".encode()])]


def max_depth(model, face, render, images_u8) -> dict[str, torch.Tensor]:
    """(B,) the largest rendered depth of each face (camera units)."""
    return {"max_depth": render.depth.flatten(1).max(1).values}


def toy_output():
    from pipeline.outputs import Output

    return Output("depth_txt", lambda s: "depth_txt" in s.extra, lambda s: ("_depth.txt",), mean_depth_files,
                  frozenset({"mesh", "render"}), max_depth, flag="(test only)")


@pytest.fixture
def toy():
    from pipeline import outputs

    before = list(outputs.OUTPUTS)
    outputs.register(toy_output())
    yield outputs.OUTPUTS["depth_txt"]
    outputs.unregister("depth_txt")
    assert list(outputs.OUTPUTS) == before


def test_the_default_outputs_and_their_suffixes():
    from pipeline.outputs import OUTPUTS, output_needs, output_suffixes
    from pipeline.settings import OutputSpec

    assert list(OUTPUTS) == DEFAULT_OUTPUTS
    assert output_suffixes(OutputSpec()) == [".png", ".obj", ".mat"]
    assert output_suffixes(OutputSpec(save_png=False, mesh_format="glb", uv_texture=True)) == [".glb", "_texture.png",
                                                                                               ".mat"]
    assert output_suffixes(OutputSpec(save_mesh=False, uv_texture=True, report=True)) == [".png", ".mat",
                                                                                          "_texture.png"]
    assert output_needs(OutputSpec(save_png=False, save_mesh=False)) == (frozenset(), [])
    needs, makers = output_needs(OutputSpec(save_mesh=False, report=True))
    assert needs == {"render", "mesh"} and len(makers) == 1


def test_an_entry_is_checked_and_a_name_taken_once(toy):
    from pipeline.outputs import Output, register

    with pytest.raises(ValueError, match="registered already"):
        register(toy_output())
    with pytest.raises(ValueError, match="may need"):
        Output("bad", lambda s: True, lambda s: (), mean_depth_files, frozenset({"depth"}))
    with pytest.raises(ValueError, match="must include 'render'"):
        Output("bad", lambda s: True, lambda s: (), mean_depth_files, frozenset({"mesh"}), max_depth)


def test_a_registered_output_is_written_and_skip_existing_looks_for_it(standin, tmp_path, toy):
    """One entry makes a new file per face: its array made on the device, its file written with
    the others; the default outputs are the same files as before; --skip_existing needs it too."""
    import dataclasses

    from options.run_specs import run_spec
    from options.test_options import parse_test_options
    from pipeline.run import run_folder

    folder = make_photo_folder(str(tmp_path / "photos"), ["000002.jpg"])
    opt = parse_test_options([f"--name={standin['name']}", "--epoch=20", f"--img_folder={folder}",
                              f"--bfm_folder={standin['bfm_folder']}",
                              f"--checkpoints_dir={standin['checkpoints_dir']}",
                              f"--results_dir={tmp_path / 'out'}", "--device=cpu", "--num_threads=0",
                              "--write_workers=0"])
    spec = run_spec(opt)
    assert run_folder(spec, torch.device("cpu"), progress=False).faces_ok == 1
    assert sorted(os.listdir(tmp_path / "out")) == ["000002.mat", "000002.obj", "000002.png"]  # not enabled
    toy_spec = dataclasses.replace(spec, outputs=dataclasses.replace(spec.outputs, extra=("depth_txt",)),
                                   skip_existing=True)
    summary = run_folder(toy_spec, torch.device("cpu"), progress=False)
    assert summary.faces_ok == 1 and summary.faces_done_before == 0  # its file was missing
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["000002.mat", "000002.obj", "000002.png", "000002_depth.txt"]
    z, far = map(float, (out / "000002_depth.txt").read_text().split())
    obj = np.array([line.split()[1:4] for line in (out / "000002.obj").read_text().splitlines()
                    if line.startswith("v ")], np.float64)
    assert z == pytest.approx(obj[:, 2].mean(), abs=1e-4)  # the same vertices as the .obj's
    assert 5.0 < far < 15.0  # a rendered depth: between the clipping planes
    again = run_folder(toy_spec, torch.device("cpu"), progress=False)
    assert again.faces_ok == 0 and again.faces_done_before == 1
