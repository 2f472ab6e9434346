"""Options shared by test.py and train.py.

Each option is a dataclass field; :func:`build_parser` turns fields into ``--name`` flags, so the
original Deep3DFaceRecon_pytorch command lines keep working (``--use_opengl False`` included:
booleans accept true/false/1/0/yes/no, and a bare flag means true).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any


def str2bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("yes", "true", "t", "y", "1"):
        return True
    if s in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (true/false), got {v!r}")


def opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field carrying its --help text (and optional argparse ``choices``)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class BaseOptions:
    # basic parameters (original names and defaults)
    name: str = opt("face_recon", "name of the experiment: checkpoints/<name>/ holds its models and results")
    gpu_ids: str = opt("0", "gpu ids, e.g. 0  0,1,2  0,2; -1 for CPU. Several ids run one process per GPU")
    checkpoints_dir: str = opt("./checkpoints", "models are loaded from and results saved under here")
    vis_batch_nums: float = opt(1, "batch nums of images for visualization (training)")
    eval_batch_nums: float = opt(math.inf, "batch nums of images for evaluation (training)")
    use_ddp: bool = opt(True, "use distributed data parallel when several GPUs are given")
    ddp_port: str = opt("12355", "port of the DDP rendezvous (single node)")
    display_per_batch: bool = opt(True, "log losses per batch")
    add_image: bool = opt(True, "add images to tensorboard")
    world_size: int = opt(1, "number of processes (set from --gpu_ids)")
    model: str = opt("facerecon", "model to use (only 'facerecon' exists)", choices=["facerecon"])
    epoch: str = opt("latest", "which epoch to load: checkpoints/<name>/epoch_<epoch>.pth")
    verbose: bool = opt(False, "print more information")
    suffix: str = opt("", "customized suffix: name = name + '_' + suffix.format(**options)")
    # model parameters
    net_recon: str = opt("resnet50", "network structure", choices=["resnet18", "resnet34", "resnet50"])
    init_path: str = opt("checkpoints/init_model/resnet50-0676ba61.pth", "ImageNet weights to start training from")
    use_last_fc: bool = opt(False, "predict all coefficients with the backbone's last fc (original option)")
    bfm_folder: str = opt("BFM", "folder with the face model files (01_MorphableModel.mat, Exp_Pca.bin, ...)")
    bfm_model: str = opt("BFM_model_front.mat", "converted face model file in --bfm_folder")
    # renderer parameters
    focal: float = opt(1015.0, "focal length in pixels")
    center: float = opt(112.0, "principal point; the image size is 2*center")
    camera_d: float = opt(10.0, "camera distance in decimetres")
    z_near: float = opt(5.0, "near clipping plane")
    z_far: float = opt(15.0, "far clipping plane")
    use_opengl: bool = opt(False, "rasterize with nvdiffrast's OpenGL context (needs EGL). Default False here "
                                  "(the original's default was True): the CUDA rasterizer needs no EGL")
    # new in this project
    device: str = opt("auto", "auto | cpu | cuda | cuda:N. auto = CUDA when available (GPU from --gpu_ids), else CPU")

    isTrain = False  # class attribute, not an option

    @property
    def phase_name(self) -> str:
        return "train" if self.isTrain else "test"


def build_parser(cls: type, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one ``--<field>`` per dataclass field of ``cls``."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        kw: dict[str, Any] = {"default": f.default, "help": f.metadata.get("help", "")}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if f.type in (bool, "bool"):
            kw.update(type=str2bool, nargs="?", const=True, metavar="BOOL")
        elif f.type in (int, "int"):
            kw["type"] = int
        elif f.type in (float, "float"):
            kw["type"] = float
        elif f.type in ("str | None",):
            kw["type"] = str
        else:
            kw["type"] = str
        parser.add_argument("--" + f.name, **kw)
    return parser


def parse_options(cls: type, argv: list[str] | None = None, description: str = ""):
    """Parse ``argv`` into an instance of ``cls`` (no side effects: nothing is written or set)."""
    ns = build_parser(cls, description).parse_args(argv)
    o = cls(**vars(ns))
    if o.suffix:
        o.name = o.name + "_" + o.suffix.format(**dataclasses.asdict(o))
    return o


def save_options(o: Any, path: str) -> None:
    """Write the resolved options as JSON (next to checkpoints or results)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({k: (str(v) if isinstance(v, float) and math.isinf(v) else v)
                   for k, v in dataclasses.asdict(o).items()}, f, indent=2, sort_keys=True)
