"""Options of train.py: the original's training flags and defaults, plus a few new ones (marked)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from models.loss_weights import LossWeights  # torch-free: the weights' defaults, stated there once
from options.base_options import BaseOptions, opt, parse_options

WEIGHTS = LossWeights()
DEFAULT_RECOG_PATH = "checkpoints/recog_model/ms1mv3_arcface_r50_fp16/backbone.pth"


@dataclass
class TrainOptions(BaseOptions):
    # dataset parameters (original names and defaults)
    data_root: str = opt("./", "dataset root: relative paths of the lists are resolved against it")
    flist: str = opt("datalist/train/list.txt", "training list (python -m data.prepare_list writes it)")
    batch_size: int = opt(32, "training batch size")
    dataset_mode: str = opt("flist", "how datasets are loaded (only 'flist')", choices=["flist"])
    serial_batches: bool = opt(False, "take images in order instead of shuffling")
    num_threads: int = opt(4, "DataLoader worker processes")
    max_dataset_size: float = opt(math.inf, "use at most this many faces of the list")
    preprocess: str = opt("shift_scale_rot_flip", "augmentations: any of shift, scale, rot, flip joined by _")
    use_aug: bool = opt(True, "augment training images")
    flist_val: str = opt("datalist/val/list.txt", "validation list (skipped when the file does not exist)")
    batch_size_val: int = opt(32, "validation batch size")
    # visualization parameters
    display_freq: int = opt(1000, "add images (input | render | overlay with landmarks) to tensorboard every N steps")
    print_freq: int = opt(100, "print and log the loss terms every N steps")
    # network saving and loading parameters
    save_latest_freq: int = opt(5000, "save checkpoints/<name>/epoch_latest.pth every N steps")
    save_epoch_freq: int = opt(1, "save checkpoints/<name>/epoch_<N>.pth every N epochs")
    evaluation_freq: int = opt(5000, "evaluate on the validation list every N steps")
    save_by_iter: bool = opt(False, "name step checkpoints iter_<step> instead of latest")
    continue_train: bool = opt(False, "resume from epoch_<--epoch>.pth (automatic when checkpoints exist)")
    epoch_count: int = opt(1, "the starting epoch (set from the checkpoint when resuming)")
    phase: str = opt("train", "phase (train)")
    pretrained_name: str = opt("", "resume from checkpoints/<pretrained_name>/ instead of checkpoints/<name>/")
    # training parameters
    n_epochs: int = opt(20, "number of epochs")
    lr: float = opt(1e-4, "initial learning rate of Adam")
    lr_policy: str = opt("step", "learning rate policy", choices=["linear", "step", "plateau", "cosine"])
    lr_decay_epochs: int = opt(10, "step policy: multiply the learning rate by 0.2 every N epochs")
    # model: identity network, photometric region, augmentation, loss weights (original names)
    net_recog: str = opt("r50", "face recognition network: ArcFace iresnet r18|r34|r50|r100, a torch.export "
                                "program (export, .pt2) or a TorchScript file (torchscript)",
                         choices=["r18", "r34", "r50", "r100", "export", "torchscript"])
    net_recog_path: str = opt(DEFAULT_RECOG_PATH, "recognition network file (InsightFace backbone.pth, .pt2, "
                                                  "TorchScript); '' or the default path missing: train without "
                                                  "the identity loss")
    use_crop_face: bool = opt(True, "photometric loss only on the front-face triangles")
    use_predef_M: bool = opt(False, "warp the rendered face to the recogniser with the input's landmarks' transform")
    shift_pixs: float = opt(10.0, "augmentation: shift in pixels")
    scale_delta: float = opt(0.1, "augmentation: scale factor delta")
    rot_angle: float = opt(10.0, "augmentation: rotation in degrees")
    w_feat: float = opt(WEIGHTS.w_feat, "weight of the identity (perceptual) loss")
    w_color: float = opt(WEIGHTS.w_color, "weight of the photometric loss")
    w_reg: float = opt(WEIGHTS.w_reg, "weight of the coefficient regularisation")
    w_id: float = opt(WEIGHTS.w_id, "weight of the identity coefficients in the regularisation")
    w_exp: float = opt(WEIGHTS.w_exp, "weight of the expression coefficients in the regularisation")
    w_tex: float = opt(WEIGHTS.w_tex, "weight of the texture coefficients in the regularisation")
    w_gamma: float = opt(WEIGHTS.w_gamma, "weight of the lighting (gamma) loss")
    w_lm: float = opt(WEIGHTS.w_lm, "weight of the landmark loss")
    w_reflc: float = opt(WEIGHTS.w_reflc, "weight of the reflectance loss")
    # new in this project
    align_lm: str = opt("lm68", "align training photos with the 5 points of the 68 landmarks (lm68, the original) "
                                "or with the 5-point detections (lm5, as test.py)", choices=["lm68", "lm5"])
    amp: str = opt("none", "network precision: none (float32) | bf16 | fp16 (CUDA autocast)",
                   choices=["none", "bf16", "fp16"])
    seed: int = opt(0, "seed of initialisation, shuffling and augmentation")
    max_steps: int = opt(0, "stop after this many steps in total (0 = run all epochs)")
    curriculum: float = opt(0.0, "fraction of the run's steps (--max_steps, else all epochs') that train the "
                                 "landmark, regularisation, gamma and reflectance terms alone, without rendering; "
                                 "the whole loss after (0 = the original's training; 0.5 gave the best regressor "
                                 "that also learnt texture and lighting on synthetic faces; the shape gets worse "
                                 "for a while when the whole loss starts; docs/training.md)")
    log_dir: str = opt("", "tensorboard folder; default checkpoints/<name>/logs")

    isTrain = True
    default_group = "training"


def parse_train_options(argv: list[str] | None = None) -> TrainOptions:
    return parse_options(TrainOptions, argv, description="Train the coefficient regressor with the hybrid loss.",
                         usage="%(prog)s --name=<name> --init_path=<weights> [options]")
