"""Options of test.py: the original's plus batching, output switches and device choice."""
from __future__ import annotations

from dataclasses import dataclass

from options.base_options import BaseOptions, opt, parse_options
from options.feature_options import ImageSetOptions, VideoOptions
from options.output_options import OutputFormatOptions


@dataclass
class TestOptions(ImageSetOptions, VideoOptions, OutputFormatOptions, BaseOptions):
    phase: str = opt("test", "phase (test)", group="data")
    dataset_mode: str = opt("None", "unused at test time (kept for the original's command lines)", group="data")
    # the original's flags that test.py accepts and ignores: listed as such in --help
    ignored_flags = ("model", "phase", "dataset_mode", "world_size", "display_per_batch")
    img_folder: str = opt("examples", "folder of photos; detections are read from <img_folder>/detections/",
                          group="data")
    # new in this project
    batch_size: int = opt(-1, "images per batch through the network, face model and renderer; -1 = auto: 64 on "
                              "CUDA (the benchmarked size: 1.1 GiB of GPU memory), 8 on the CPU", group="performance")
    num_threads: int = opt(-1, "DataLoader worker processes decoding and aligning photos (0 = in the main process; "
                               "-1 = auto: cores per rank - 1, at most 16; none when the folder fits one batch)",
                           group="performance")
    resample_on_device: bool = opt(False, "make the aligned crops (PIL's bicubic resize, the same pixels) on the "
                                          "run's device; the DataLoader workers then only decode photos and fit "
                                          "the alignment (for GPU hosts whose CPU limits the rate)",
                                   group="performance")
    decode_on_device: bool = opt(False, "also decode JPEG photos on the run's device (nvJPEG through torchvision, "
                                        "which must be installed; implies --resample_on_device): the workers then "
                                        "only read files. Not PIL's pixels: nvJPEG's colour upsampling differs "
                                        "(coefficient differences in the README)", group="performance")
    prefetch_batches: int = opt(-1, "batches a thread readies on the device (crops, and JPEG decoding with "
                                    "--decode_on_device) while the network runs on the current one (0 = none: "
                                    "the main thread readies each batch; -1 = auto: 2 on CUDA, 0 on the CPU)",
                                group="performance")
    save_mesh: bool = opt(True, "write <name>.obj", group="outputs")
    save_png: bool = opt(True, "write <name>.png (input | render overlay | overlay with landmarks)", group="outputs")
    save_mat: bool = opt(True, "write <name>.mat (coefficients and 68 landmarks)", group="outputs")
    skip_existing: bool = opt(False, "leave out faces whose requested outputs (.png/.obj/.mat, as the save_* "
                                     "switches ask, and with --report its per-face files in report/) are all in the "
                                     "results folder already: resumes an interrupted run (files are complete or "
                                     "absent). Only the files' presence is checked",
                              group="outputs")
    recursive: bool = opt(False, "also process photos in sub-folders (detections mirrored under detections/)",
                          group="data")
    results_dir: str = opt("", "where results go; default checkpoints/<name>/results/<folder name>/epoch_<E>_000000",
                           group="outputs")
    amp: str = opt("none", "network precision: none (float32) | bf16 | fp16 (CUDA autocast)",
                   choices=["none", "bf16", "fp16"], group="performance")
    tf32: bool = opt(False, "let cuDNN run the network's float32 convolutions in TF32 (PyTorch's own default; "
                            "faster on Ampere and later GPUs, coefficients differ from float32 as the README "
                            "says); off: full float32", group="performance")
    channels_last: bool = opt(False, "run the network in channels_last memory format", group="performance")
    compile: bool = opt(False, "torch.compile the network (CUDA; first batch slower)", group="performance")
    write_workers: int = opt(-1, "processes writing .obj/.png/.mat off the critical path (0 = in the main process; "
                                 "-1 = auto: one per core per rank, at most 16; none for runs of <= 32 faces)",
                             group="performance")
    fit_steps: int = opt(0, "refine each face's coefficients with N steps of landmark+photometric fitting (0 = off); "
                            "faces with landmarks/<name>.txt (process_images.sh --landmarks68) are fitted to those "
                            "68 points, the others to their 5 detected points", group="fitting")
    fit_loss: str = opt("front", "what that fitting minimises: front = the front-face triangles only, at rates "
                                 "made for a few hundred steps; train = the training loss exactly, one slow rate; "
                                 "staged = a short front phase, then the training loss (0.003, then 0.005): for "
                                 "3000 steps it reached the loss's optimum on synthetic faces (docs/training.md)",
                        choices=["front", "train", "staged"], group="fitting")


def parse_test_options(argv: list[str] | None = None) -> TestOptions:
    return parse_options(TestOptions, argv, description="Reconstruct 3D faces from a folder of photos.",
                         usage="%(prog)s --name=<model> --epoch=<epoch> --img_folder=<folder> [options]")
