"""Train the coefficient regressor with the paper's weakly-supervised hybrid loss.

    python -m data.prepare_list --img_folder <folders> --out datalist/train/list.txt
    python train.py --name=<name> --init_path=<resnet50 ImageNet weights> [--net_recog_path=<backbone.pth>]

Writes checkpoints/<name>/epoch_<N>.pth after each epoch (the original's format: test.py loads it
unchanged) and epoch_latest.pth every --save_latest_freq steps, at the end of every epoch and when
stopped (Ctrl-C or SIGTERM); both hold the optimizer and scheduler state. Running the same command
again resumes where the run stopped (the original's automatic --continue_train). The resolved
options go to checkpoints/<name>/train_opt.json, tensorboard logs to checkpoints/<name>/logs.
Exit code: 0 done, 2 the run could not start (the message says what is missing), 130 stopped.

Several GPUs (``--use_ddp True``, the default): ``--gpu_ids 0,1`` runs train.py under torchrun, one
process per GPU (the original spawned them itself), or launch it yourself,
``torchrun --nproc_per_node N train.py ...`` (also on the CPU, with gloo). Each rank takes its
share of every batch of ``--batch_size`` (which stays the whole batch, as in the original), the
gradients are averaged (DistributedDataParallel; on CUDA the batch-norm statistics too, with
SyncBatchNorm), and rank 0 alone writes checkpoints, logs and validation figures.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("train")

CKPT_KEYS = ("net_recon", "opt_00", "sched_00", "epoch", "epoch_iter", "epoch_complete", "total_iters")


class TrainSetupError(RuntimeError):
    """Training cannot start; the message says what to do."""


# --------------------------------------------------------------------------- building blocks
def load_init_weights(net, path: str) -> None:
    """Load ImageNet ResNet weights (torchvision layout, e.g. resnet50-0676ba61.pth) into the
    backbone; the classifier ``fc`` is dropped (the original's ``filter_state_dict``)."""
    if not os.path.isfile(path):
        raise TrainSetupError(
            f"--init_path {path} not found. Give ImageNet weights of the backbone (torchvision's "
            f"{os.path.basename(path) or 'resnet50-0676ba61.pth'}, the original's initialisation) or pass "
            "--init_path '' to start from random weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainSetupError(f"cannot read --init_path {path}: {str(e).strip().splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()
             if not (k.startswith("fc.") or k.startswith("module.fc."))}
    missing, unexpected = net.backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise TrainSetupError(f"--init_path {path} does not fit --net_recon: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    log.info("initialised the backbone from %s", path)


def build_recog(opt):
    """The identity network, or None (then the identity loss is off; said once)."""
    from models.recog import RecogError, load_recog_net
    from options.train_options import DEFAULT_RECOG_PATH

    path = opt.net_recog_path
    if opt.w_feat <= 0:
        return None
    if not path or (path == DEFAULT_RECOG_PATH and not os.path.isfile(path)):
        log.warning("no face recognition network (--net_recog_path %s): training without the identity loss "
                    "(w_feat 0). Give an InsightFace ArcFace backbone.pth to use it", path or "''")
        return None
    try:
        return load_recog_net(opt.net_recog, path)
    except RecogError as e:
        raise TrainSetupError(str(e)) from None


def loss_weights(opt):
    """The ``--w_*`` options as a :class:`models.loss_weights.LossWeights`."""
    from models.loss_weights import LossWeights

    return LossWeights(**{f.name: float(getattr(opt, f.name)) for f in dataclasses.fields(LossWeights)})


def make_scheduler(optimizer, opt):
    """The original's learning rate policies, stepped once per epoch."""
    from torch.optim import lr_scheduler

    if opt.lr_policy == "linear":
        return lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda e: 1.0 - max(0, e + opt.epoch_count - opt.n_epochs)
                                     / float(opt.n_epochs + 1))
    if opt.lr_policy == "step":
        return lr_scheduler.StepLR(optimizer, step_size=opt.lr_decay_epochs, gamma=0.2)
    if opt.lr_policy == "plateau":
        return lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.2, threshold=0.01, patience=5)
    return lr_scheduler.CosineAnnealingLR(optimizer, T_max=opt.n_epochs, eta_min=0)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a run of several processes (one per GPU, or torchrun's ranks).

    Attributes:
        rank, world: this process is rank ``rank`` of ``world``.
        local_rank: its index on this machine (picks its GPU); None for a run of one process.
    """

    rank: int = 0
    world: int = 1
    local_rank: int | None = None

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files (checkpoints, logs): rank 0."""
        return self.rank == 0


class EpochSampler(torch.utils.data.Sampler):
    """A reproducible permutation per (seed, epoch), starting at ``start`` (to resume mid-epoch).

    With ``world`` > 1 each rank yields its share of every whole batch of ``batch_size`` (all
    ranks together) in turn: rank r the r-th of ``world`` consecutive parts, so the ranks'
    batches together are the batches one process takes, and ``start`` counts whole batches' faces.
    """

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1, batch_size: int = 1):
        if world > 1 and batch_size % world:
            raise ValueError(f"a batch of {batch_size} does not split into {world} equal parts")
        self.n, self.seed, self.epoch, self.start, self.shuffle = n, seed, epoch, start, shuffle
        self.rank, self.world, self.batch_size = rank, world, batch_size

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def _mine(self) -> list[int]:
        rest = self.order()[self.start:]
        if self.world == 1:
            return rest
        part = self.batch_size // self.world
        first = self.rank * part
        return [i for b in range(0, len(rest) - self.batch_size + 1, self.batch_size)
                for i in rest[b + first:b + first + part]]

    def __iter__(self):
        return iter(self._mine())

    def __len__(self) -> int:
        rest = max(0, self.n - self.start)
        return rest if self.world == 1 else rest // self.batch_size * (self.batch_size // self.world)


@dataclass
class TrainState:
    """Where training stands: ``epoch`` (1-based) and the batches of it already done."""

    epoch: int = 1
    epoch_iter: int = 0
    total_iters: int = 0


def checkpoint_dir(opt) -> str:
    return os.path.join(opt.checkpoints_dir, opt.name)


def save_checkpoint(path: str, net, optimizer, scheduler, state: TrainState, epoch_complete: bool) -> None:
    """The original's layout ({'net_recon', 'opt_00', 'sched_00'}) plus the position, atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".part"
    torch.save({"net_recon": net.state_dict(), "opt_00": optimizer.state_dict(),
                "sched_00": scheduler.state_dict(), "epoch": state.epoch, "epoch_iter": state.epoch_iter,
                "epoch_complete": epoch_complete, "total_iters": state.total_iters}, tmp)
    os.replace(tmp, path)


def resume_path(opt) -> str | None:
    """The checkpoint to resume from, or None for a fresh run (automatic when epoch_latest.pth exists)."""
    folder = os.path.join(opt.checkpoints_dir, opt.pretrained_name or opt.name)
    path = os.path.join(folder, f"epoch_{opt.epoch}.pth")
    if opt.continue_train or opt.pretrained_name:
        if not os.path.isfile(path):
            raise TrainSetupError(f"--continue_train: {path} not found (checkpoints are epoch_<N>.pth and "
                                  "epoch_latest.pth in checkpoints/<name>/)")
        return path
    return path if opt.epoch == "latest" and os.path.isfile(path) else None


def resume(path: str, net, optimizer, scheduler) -> TrainState:
    from models.networks import CheckpointError, load_checkpoint

    try:
        ckpt = load_checkpoint(path)
        net.load_state_dict(ckpt["net_recon"], strict=True)
    except (CheckpointError, RuntimeError) as e:
        raise TrainSetupError(f"cannot resume from {path}: {str(e).splitlines()[0]}") from None
    if "opt_00" in ckpt:
        optimizer.load_state_dict(ckpt["opt_00"])
    if "sched_00" in ckpt:
        scheduler.load_state_dict(ckpt["sched_00"])
    epoch = int(ckpt.get("epoch", 0))
    state = TrainState(epoch=epoch, epoch_iter=int(ckpt.get("epoch_iter", 0)),
                       total_iters=int(ckpt.get("total_iters", 0)))
    if ckpt.get("epoch_complete", True):
        state.epoch, state.epoch_iter = epoch + 1, 0
    log.info("resuming from %s: epoch %d, batch %d, step %d", path, state.epoch, state.epoch_iter, state.total_iters)
    return state


def visuals(images: torch.Tensor, out, gt_lm: torch.Tensor, n: int = 4) -> np.ndarray:
    """(n, H, 3W, 3) uint8: input | render over input | overlay with landmarks (gt blue, predicted red)."""
    from util.visualize import compose_result

    k = min(n, images.shape[0])

    def hwc(x):
        return x[:k].detach().float().permute(0, 2, 3, 1).cpu().numpy()

    return compose_result(hwc(images), hwc(out.render), hwc(out.mask), out.face.landmark[:k].detach().cpu().numpy(),
                          gt_lm[:k].detach().cpu().numpy())


def train_step(model, loss_fn, optimizer, images, gt_lm, atten_mask=None, scaler=None, net=None):
    """One optimisation step (``net``: the network's DistributedDataParallel wrapper, whose
    backward averages the ranks' gradients); returns the :class:`models.losses.HybridOutput`."""
    from models.losses import backward_step

    model.net.train()
    coeffs = model.predict_coeffs(images, net)
    out = loss_fn(coeffs, images, gt_lm, atten_mask=atten_mask)
    backward_step(out.terms.total, optimizer, scaler)
    return out


def landmark_step(model, weights, optimizer, images, gt_lm, scaler=None, net=None) -> torch.Tensor:
    """One step of a curriculum's first stage: the loss without its image terms
    (:func:`models.fitting.landmark_stage_loss`: landmark, regularisation, gamma and reflectance,
    ``weights``' weights; no render). ``net`` as :func:`train_step`. Returns the () loss, detached."""
    from models.fitting import landmark_stage_loss
    from models.losses import backward_step

    model.net.train()
    loss = landmark_stage_loss(model.face_model, model.predict_coeffs(images, net).float(), gt_lm, weights)
    backward_step(loss, optimizer, scaler)
    return loss.detach()


def curriculum_steps(fraction: float, max_steps: int, n_epochs: int, batches_per_epoch: int) -> int:
    """How many leading steps ``--curriculum fraction`` gives the landmark stage: that fraction of
    the run's steps (``--max_steps`` when set, else every epoch's batches), rounded down."""
    return int(fraction * (max_steps or n_epochs * batches_per_epoch))


# --------------------------------------------------------------------------- several processes
def torchrun_ranks() -> Ranks:
    """This process's place as torchrun sets it (:func:`pipeline.runtime.torchrun_place`), else one process."""
    from pipeline.runtime import torchrun_place

    place = torchrun_place()
    return Ranks() if place is None else Ranks(*place)


def join_process_group(device: torch.device, ranks: Ranks) -> None:
    """Join the run's process group (torchrun's rendezvous, from the environment): NCCL between
    GPUs, gloo on the CPU. Its collectives may wait 2 hours (NCCL's default is 10 minutes): the
    other ranks wait at the next step while rank 0 alone runs the validation."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ranks.rank, world_size=ranks.world,
                            timeout=datetime.timedelta(hours=2))


def torchrun_args(n: int, argv: list[str]) -> list[str]:
    """torchrun's arguments for ``n`` processes of this script on this machine with ``argv``."""
    return ["--standalone", "--nnodes", "1", "--nproc_per_node", str(n), os.path.abspath(__file__), *argv]


def run_under_torchrun(n: int, argv: list[str]) -> int:
    """``--gpu_ids`` with several GPUs: this command again under torchrun, one process per GPU
    (the original spawned them itself); the ranks' worst exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    log.info("--gpu_ids with %d GPUs: one training process per GPU (torchrun)", n)
    try:
        torchrun(torchrun_args(n, argv))
    except ChildFailedError as e:
        return max((f.exitcode for f in e.failures.values()), default=1) or 1
    except SignalException:  # Ctrl-C or SIGTERM: torchrun passed it on and the ranks stopped (and saved)
        return 130
    return 0


# --------------------------------------------------------------------------- the run
class Trainer:
    """Everything a run needs, built from options (errors before the first step)."""

    def __init__(self, opt, ranks: Ranks = Ranks()):
        from data.train_dataset import AugmentConfig, DataError, FaceTrainDataset, read_list
        from models.bfm import ParametricFaceModel
        from models.facerecon import FaceReconModel
        from pipeline.runtime import SetupError, gpu_id_list, renderer_backend, resolve_device
        from models.losses import HybridLoss
        from models.networks import ReconNet
        from models.renderer import create_renderer
        from util.assets import MissingAssetError
        from util.preprocess import load_lm3d

        self.opt, self.ranks = opt, ranks
        try:
            self.device = resolve_device(opt.device, opt.gpu_ids, ranks.local_rank)
        except SetupError as e:
            raise TrainSetupError(str(e)) from None
        if ranks.world == 1 and len(gpu_id_list(opt.gpu_ids)) > 1:
            log.warning("--gpu_ids %s with %s: training on %s only", opt.gpu_ids,
                        "--use_ddp False" if not opt.use_ddp else f"--device {opt.device}", self.device)
        if not 0.0 <= opt.curriculum < 1.0:
            raise TrainSetupError(f"--curriculum is a fraction of the training steps in [0, 1) (0 = the original's "
                                  f"training), got {opt.curriculum}")
        if opt.batch_size % ranks.world:
            raise TrainSetupError(f"--batch_size {opt.batch_size} does not split among {ranks.world} processes: "
                                  f"give a multiple of {ranks.world}")
        if ranks.world > 1:
            join_process_group(self.device, ranks)
        torch.manual_seed(opt.seed)
        try:
            lm3d = load_lm3d(opt.bfm_folder)
            face_model = ParametricFaceModel.from_folder(opt.bfm_folder, opt.bfm_model, camera_distance=opt.camera_d,
                                                         focal=opt.focal, center=opt.center)
        except (MissingAssetError, ValueError) as e:
            raise TrainSetupError(str(e)) from None
        try:
            need_lm5 = opt.align_lm == "lm5"
            train_entries = read_list(opt.flist, opt.data_root, opt.max_dataset_size, need_lm5)
            val_entries = (read_list(opt.flist_val, opt.data_root, math.inf, need_lm5)
                           if opt.flist_val and os.path.isfile(opt.flist_val) else [])
        except DataError as e:
            raise TrainSetupError(str(e)) from None
        if len(train_entries) < opt.batch_size:
            raise TrainSetupError(f"the training list has {len(train_entries)} face(s), fewer than one batch "
                                  f"(--batch_size {opt.batch_size})")
        augment = AugmentConfig(use_aug=opt.use_aug, preprocess=opt.preprocess, shift_pixs=opt.shift_pixs,
                                scale_delta=opt.scale_delta, rot_angle=opt.rot_angle)
        self.train_set = FaceTrainDataset(train_entries, lm3d, augment, opt.align_lm, opt.seed)
        self.val_set = (FaceTrainDataset(val_entries, lm3d, AugmentConfig(use_aug=False), opt.align_lm)
                        if val_entries else None)

        net = ReconNet(opt.net_recon, use_last_fc=opt.use_last_fc)
        if opt.init_path:
            load_init_weights(net, opt.init_path)
        else:
            log.warning("--init_path '': the backbone starts from random weights")
        if ranks.world > 1 and self.device.type == "cuda":  # batch statistics over all ranks, as the original
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # (same state_dict keys as BatchNorm)
        self.recog = build_recog(opt)
        renderer = create_renderer(renderer_backend(self.device, opt.use_opengl), focal=opt.focal, center=opt.center,
                                   z_near=opt.z_near, z_far=opt.z_far, device=self.device)
        self.model = FaceReconModel(net, face_model, renderer, amp=opt.amp).to(self.device)
        weights = loss_weights(opt)
        self.loss_fn = HybridLoss(face_model, renderer, weights, recog=self.recog, use_crop_face=opt.use_crop_face,
                                  use_predef_M=opt.use_predef_M)
        if self.recog is not None:
            self.recog.to(self.device)
        self.optimizer = torch.optim.Adam(net.parameters(), lr=opt.lr)
        self.scheduler = make_scheduler(self.optimizer, opt)
        self.scaler = torch.amp.GradScaler("cuda") if opt.amp == "fp16" and self.device.type == "cuda" else None
        self.state = TrainState(epoch=opt.epoch_count)
        path = resume_path(opt)
        if path is not None:
            self.state = resume(path, net, self.optimizer, self.scheduler)
        self.ddp = None  # the network's DistributedDataParallel wrapper for the training steps
        if ranks.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda"
                                               else None)
        self.stop = False

    # -- helpers -------------------------------------------------------------------------
    def loader(self, dataset, batch_size: int, sampler):
        from torch.utils.data import DataLoader

        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.opt.num_threads // self.ranks.world, pin_memory=self.device.type == "cuda",
                          persistent_workers=False)

    def to_device(self, batch):
        d = self.device
        return (batch["imgs"].to(d, non_blocking=True), batch["lms"].to(d, non_blocking=True),
                batch["msks"].to(d, non_blocking=True))

    def save(self, tag: str, epoch_complete: bool) -> str:
        """Write ``epoch_<tag>.pth`` (rank 0 only: the ranks' networks are the same); its path."""
        path = os.path.join(checkpoint_dir(self.opt), f"epoch_{tag}.pth")
        if self.ranks.main:
            save_checkpoint(path, self.model.net, self.optimizer, self.scheduler, self.state, epoch_complete)
        return path

    def any_rank_stopping(self) -> bool:
        """Whether this or any other rank was asked to stop (all ranks stop after the same step)."""
        if self.ranks.world == 1:
            return self.stop
        import torch.distributed as dist

        flag = torch.tensor([float(self.stop)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    @torch.no_grad()
    def evaluate(self, writer) -> dict[str, float]:
        opt = self.opt
        self.model.net.eval()
        sums: dict[str, float] = {}
        n = 0
        loader = self.loader(self.val_set, opt.batch_size_val, EpochSampler(len(self.val_set), 0, 0, shuffle=False))
        for j, batch in enumerate(loader):
            if j >= opt.eval_batch_nums:
                break
            images, lms, msks = self.to_device(batch)
            out = self.loss_fn(self.model.predict_coeffs(images), images, lms, atten_mask=msks)
            for k, v in out.terms.as_floats().items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            if writer is not None and opt.add_image and j < opt.vis_batch_nums:
                writer.add_images(f"val/vis_{j}", visuals(images, out, lms), self.state.total_iters, dataformats="NHWC")
        self.model.net.train()
        return {k: v / max(1, n) for k, v in sums.items()}

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> int:
        from options.base_options import save_options

        opt, st, ranks = self.opt, self.state, self.ranks
        folder = checkpoint_dir(opt)
        writer = None
        if ranks.main:
            os.makedirs(folder, exist_ok=True)
            save_options(opt, os.path.join(folder, "train_opt.json"))
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(opt.log_dir or os.path.join(folder, "logs"), purge_step=st.total_iters or None)
            except ImportError:
                log.warning("tensorboard is not installed: no tensorboard logs")
        n_batches = len(self.train_set) // opt.batch_size
        log.info("%d training faces, %d batches per epoch, epochs %d..%d, device %s%s", len(self.train_set),
                 n_batches, st.epoch, opt.n_epochs, self.device,
                 f", {ranks.world} processes of {opt.batch_size // ranks.world} faces a batch" if ranks.world > 1 else "")
        landmark_steps = curriculum_steps(opt.curriculum, opt.max_steps, opt.n_epochs, n_batches)
        if st.total_iters < landmark_steps:
            log.info("--curriculum %g: the first %d step(s) train the landmark, regularisation, gamma and "
                     "reflectance terms alone (no render), the whole loss after", opt.curriculum, landmark_steps)
        t_last = time.perf_counter()
        last_total = math.inf
        if opt.max_steps and st.total_iters >= opt.max_steps:
            log.info("already at step %d of --max_steps %d", st.total_iters, opt.max_steps)
            return 0
        try:
            while st.epoch <= opt.n_epochs and not self.stop:
                self.train_set.set_epoch(st.epoch)
                sampler = EpochSampler(len(self.train_set), opt.seed, st.epoch, st.epoch_iter * opt.batch_size,
                                       shuffle=not opt.serial_batches, rank=ranks.rank, world=ranks.world,
                                       batch_size=opt.batch_size)
                for batch in self.loader(self.train_set, opt.batch_size // ranks.world, sampler):
                    images, lms, msks = self.to_device(batch)
                    if st.total_iters < landmark_steps:  # the curriculum's first stage: nothing rendered
                        out = None
                        total = landmark_step(self.model, self.loss_fn.weights, self.optimizer, images, lms,
                                              self.scaler, self.ddp)
                    else:
                        if st.total_iters == landmark_steps > 0:
                            log.info("step %d: the landmark stage is over, training with the whole loss",
                                     st.total_iters + 1)
                        out = train_step(self.model, self.loss_fn, self.optimizer, images, lms, msks, self.scaler,
                                         self.ddp)
                        total = out.terms.total.detach()
                    if opt.lr_policy == "plateau":
                        last_total = float(total)
                    st.epoch_iter += 1
                    st.total_iters += 1
                    first = st.total_iters == 1
                    if first or st.total_iters % opt.print_freq == 0:
                        losses = out.terms.as_floats() if out is not None else {"landmark_stage": float(total)}
                        now = time.perf_counter()
                        log.info("epoch %d batch %d/%d step %d (%.3f s/step) %s", st.epoch, st.epoch_iter, n_batches,
                                 st.total_iters, (now - t_last) / (1 if first else opt.print_freq),
                                 " ".join(f"{k} {v:.4f}" for k, v in losses.items()))
                        t_last = now
                        if writer is not None:
                            for k, v in losses.items():
                                writer.add_scalar(f"train/loss_{k}", v, st.total_iters)
                            writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], st.total_iters)
                    if (writer is not None and opt.add_image and out is not None
                            and (first or st.total_iters % opt.display_freq == 0)):
                        writer.add_images("train/vis", visuals(images, out, lms), st.total_iters, dataformats="NHWC")
                    if self.val_set is not None and ranks.main and (first or st.total_iters % opt.evaluation_freq == 0):
                        val = self.evaluate(writer)
                        log.info("validation at step %d: %s", st.total_iters,
                                 " ".join(f"{k} {v:.4f}" for k, v in val.items()))
                        if writer is not None:
                            for k, v in val.items():
                                writer.add_scalar(f"val/loss_{k}", v, st.total_iters)
                    if st.total_iters % opt.save_latest_freq == 0:
                        tag = f"iter_{st.total_iters}" if opt.save_by_iter else "latest"
                        self.save(tag, epoch_complete=False)
                        if tag != "latest":
                            self.save("latest", epoch_complete=False)
                    self.stop = self.any_rank_stopping()
                    if self.stop or (opt.max_steps and st.total_iters >= opt.max_steps):
                        self.stop = True
                        break
                if self.stop:
                    break
                if opt.lr_policy == "plateau":
                    self.scheduler.step(last_total)
                else:
                    self.scheduler.step()
                if st.epoch % opt.save_epoch_freq == 0:
                    self.save(str(st.epoch), epoch_complete=True)
                self.save("latest", epoch_complete=True)
                log.info("end of epoch %d / %d, step %d", st.epoch, opt.n_epochs, st.total_iters)
                st.epoch += 1
                st.epoch_iter = 0
        finally:
            if self.stop:
                path = self.save("latest", epoch_complete=False)
                if ranks.main:
                    log.warning("stopped at epoch %d batch %d (step %d); saved %s - run the same command to resume",
                                st.epoch, st.epoch_iter, st.total_iters, path)
            if writer is not None:
                writer.close()
        return 0


def main(argv: list[str] | None = None) -> int:
    from options.train_options import parse_train_options

    argv = sys.argv[1:] if argv is None else list(argv)
    opt = parse_train_options(argv)
    ranks = torchrun_ranks()
    logging.basicConfig(level=logging.INFO if ranks.main else logging.WARNING,  # rank 0 tells the run
                        format="%(asctime)s %(levelname)s: %(message)s" if ranks.world == 1
                        else f"%(asctime)s %(levelname)s rank {ranks.rank}: %(message)s")
    from pipeline.runtime import gpu_id_list

    ids = gpu_id_list(opt.gpu_ids)
    if ranks.world > 1 and not opt.use_ddp:
        print(f"error: --use_ddp False in a run of {ranks.world} processes (torchrun): each would train alone and "
              "write the same checkpoints; drop --use_ddp False, or run train.py as one process", file=sys.stderr)
        return 2
    if ranks.world == 1 and opt.use_ddp and len(ids) > 1 and opt.device in ("auto", "cuda"):
        if torch.cuda.device_count() < max(ids) + 1:
            print(f"error: --gpu_ids {opt.gpu_ids} asks for GPU {max(ids)}, but torch sees "
                  f"{torch.cuda.device_count()} CUDA device(s); give the GPUs this machine has", file=sys.stderr)
            return 2
        return run_under_torchrun(len(ids), argv)
    try:
        trainer = Trainer(opt, ranks)
    except TrainSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    interrupted = []

    def on_signal(signum, frame):
        interrupted.append(signum)
        trainer.stop = True
        log.warning("signal %d: stopping after this step (send it again to abort now)", signum)
        signal.signal(signum, signal.SIG_DFL)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = trainer.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if ranks.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 130 if interrupted else code


if __name__ == "__main__":
    sys.exit(main())
