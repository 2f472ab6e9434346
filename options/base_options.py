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


# --help sections, in this order; a field names its section with opt(..., group=...)
GROUPS = {
    "data": "photos and detections",
    "model": "model: checkpoint, network, face model",
    "renderer": "renderer and camera",
    "outputs": "outputs and messages",
    "sets": "image sets: one identity from several photos of a person",
    "video": "video input",
    "performance": "devices and performance",
    "fitting": "per-image fitting",
    "training": "training",
    "ignored": "accepted for the original's command lines, ignored",
}


def opt(default: Any, help: str, group: str = "", train_only: bool = False, **kw) -> Any:
    """A dataclass field carrying its --help text, its --help section (``group``, a key of
    :data:`GROUPS`) and optional argparse ``choices``. ``train_only``: accepted by test.py too
    (the original's command lines) but listed only in train.py's --help."""
    return field(default=default, metadata={"help": help, "group": group, "train_only": train_only, **kw})


@dataclass
class BaseOptions:
    # basic parameters (original names and defaults)
    name: str = opt("face_recon", "name of the experiment: checkpoints/<name>/ holds its models and results",
                    group="model")
    gpu_ids: str = opt("0", "gpu ids, e.g. 0  0,1,2  0,2; -1 for CPU. Several ids run one process per GPU",
                       group="performance")
    checkpoints_dir: str = opt("./checkpoints", "models are loaded from and results saved under here", group="model")
    vis_batch_nums: float = opt(1, "batch nums of images for visualization", group="training", train_only=True)
    eval_batch_nums: float = opt(math.inf, "batch nums of images for evaluation", group="training", train_only=True)
    use_ddp: bool = opt(True, "train on several GPUs with DistributedDataParallel: one process per GPU of "
                              "--gpu_ids (or each rank of torchrun), --batch_size split among them; False: "
                              "the first GPU only", group="training", train_only=True)
    ddp_port: str = opt("12355", "port of the processes' rendezvous when --gpu_ids gives several GPUs (one machine)",
                        group="performance")
    display_per_batch: bool = opt(True, "ignored: accepted for the original's command lines (losses are logged every "
                                        "--print_freq steps)", group="training", train_only=True)
    add_image: bool = opt(True, "add images to tensorboard", group="training", train_only=True)
    world_size: int = opt(1, "number of processes (set from --gpu_ids)", group="performance")
    model: str = opt("facerecon", "model to use (only 'facerecon' exists)", group="model", choices=["facerecon"])
    epoch: str = opt("latest", "which epoch to load: checkpoints/<name>/epoch_<epoch>.pth", group="model")
    verbose: bool = opt(False, "print more information", group="outputs")
    suffix: str = opt("", "customized suffix: name = name + '_' + suffix.format(**options)", group="model")
    # model parameters
    net_recon: str = opt("resnet50", "network structure", group="model", choices=["resnet18", "resnet34", "resnet50"])
    init_path: str = opt("checkpoints/init_model/resnet50-0676ba61.pth", "ImageNet weights to start training from",
                         group="training", train_only=True)
    use_last_fc: bool = opt(False, "predict all coefficients with the backbone's last fc (original option)",
                            group="model")
    bfm_folder: str = opt("BFM", "folder with the face model files (01_MorphableModel.mat, Exp_Pca.bin, ...)",
                          group="model")
    bfm_model: str = opt("BFM_model_front.mat", "converted face model file in --bfm_folder", group="model")
    # renderer parameters
    focal: float = opt(1015.0, "focal length in pixels", group="renderer")
    center: float = opt(112.0, "principal point; the image size is 2*center", group="renderer")
    camera_d: float = opt(10.0, "camera distance in decimetres", group="renderer")
    z_near: float = opt(5.0, "near clipping plane", group="renderer")
    z_far: float = opt(15.0, "far clipping plane", group="renderer")
    use_opengl: bool = opt(False, "rasterize with nvdiffrast's OpenGL context (needs EGL). Default False here "
                                  "(the original's default was True): the CUDA rasterizer needs no EGL",
                           group="renderer")
    # new in this project
    device: str = opt("auto", "auto | cpu | cuda | cuda:N. auto = CUDA when available (GPU from --gpu_ids), else CPU",
                      group="performance")

    isTrain = False  # class attributes, not options
    default_group = ""  # the --help section of fields that name none

    @property
    def phase_name(self) -> str:
        return "train" if self.isTrain else "test"


class OneLineErrorParser(argparse.ArgumentParser):
    """An argparse parser whose errors (bad value, unknown option) take one line, without the
    usage block: ``<prog>: error: <what>; <prog> --help lists the options``; exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; {self.prog} --help lists the options\n")


def build_parser(cls: type, description: str = "", usage: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--<field>`` per dataclass field of ``cls``, in the --help
    sections of :data:`GROUPS` (fields without a group: ``cls.default_group``'s, else the parser's
    own list). Fields marked ``train_only`` are accepted but not listed unless ``cls.isTrain``;
    those named in ``cls.ignored_flags`` are accepted and listed in the "ignored" section only."""
    parser = OneLineErrorParser(description=description, usage=usage,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    default = getattr(cls, "default_group", "")
    ignored = set(getattr(cls, "ignored_flags", ()))
    groups = ["ignored" if f.name in ignored else f.metadata.get("group") or default for f in dataclasses.fields(cls)]
    sections = {g: parser.add_argument_group(title) for g, title in GROUPS.items() if g in groups}
    listed = getattr(cls, "isTrain", True)
    for f, group in zip(dataclasses.fields(cls), groups):
        kw: dict[str, Any] = {"default": f.default, "help": f.metadata.get("help", "")}
        if f.name in ignored:
            kw["help"] = "ignored"
        elif f.metadata.get("train_only") and not listed:
            kw["help"] = argparse.SUPPRESS
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if f.type in (bool, "bool"):
            kw.update(type=str2bool, nargs="?", const=True, metavar="BOOL")
        elif f.type in (int, "int"):
            kw["type"] = int
        elif f.type in (float, "float"):
            kw["type"] = float
        else:
            kw["type"] = str
        sections.get(group, parser).add_argument("--" + f.name, **kw)
    return parser


def parse_options(cls: type, argv: list[str] | None = None, description: str = "", usage: str | None = None):
    """Parse ``argv`` into an instance of ``cls`` (no side effects: nothing is written or set)."""
    ns = build_parser(cls, description, usage).parse_args(argv)
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
