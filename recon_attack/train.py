"""Training the attacker's decoder on what crosses the cut: seeded batches, the recipe (optimizer, schedule, loss,
augmentation, averaging), the stopping rule, checkpoints that carry all that rebuilds the attack and goes on exactly,
and torchrun."""
import dataclasses
import math
import os
import signal
import threading
import time
from typing import NamedTuple
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from pytorch_msssim import ssim
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from .attacks import attacker_label, build_attack, feature_error
from .checkpoint import CHECKPOINT_FORMAT
from .config import Derived
from .data import full_batches, load_splits
from .distributed import (gather_from_processes, is_main_process, main_first, mean_over_processes, rank_and_world,
                          same_on_all_processes, save_if_main)
from .evaluate import PRIOR_IMAGES, evaluate, evaluate_and_report, mean_image_baseline, mean_training_image, run_bound
from .metrics import format_summary, msssim_note, summarise
from .noise import generator, training_draws
from .records import to_record
from .stopping import STOP_KEY, Plateau, stopping_note
from .utils import Interrupted, RunError, UsageError, progress, save_json, save_torch
from .visualize import draw_all, live_curves, run_attack

LOSSES = ('mse', 'l1', 'ssim', 'mix')
MIX_SSIM_SHARE = 0.84  # --loss mix: 0.84 (1 - SSIM) + 0.16 L1, the mix of Zhao et al. 2017 (IEEE TCI)
AUGMENT_MIN_SCALE = 0.6  # --augment crops keep 60-100 % of the image side
# --tensorboard's scalar of each column of the training history
CURVES = {'train_loss': 'loss/train', 'val_loss': 'loss/validation_mse', 'psnr': 'validation/psnr_db',
          'ssim': 'validation/ssim', 'ms_ssim': 'validation/ms_ssim', 'lr': 'learning_rate',
          'seconds': 'time/epoch_seconds'}


def make_optimizer(training, params, device):
    """The optimizer a config.TrainConfig names."""
    fused = {'fused': True} if device.type == 'cuda' else {}
    if training.optim == 'sgd':
        return torch.optim.SGD(params, lr=training.lr, momentum=0.9, weight_decay=training.weight_decay)
    optimizer = {'adam': torch.optim.Adam, 'adamw': torch.optim.AdamW}[training.optim]
    return optimizer(params, lr=training.lr, weight_decay=training.weight_decay, **fused)


class Budget:
    """The epochs a run trains for: --num_epochs, or, with --minutes, as many as fit once the first epoch is timed
    (the cosine schedule reads it at every step)."""

    def __init__(self, epochs):
        self.epochs = epochs


def make_scheduler(training, optimizer, n_train, batch_size, budget=None):
    """`step`: stepped once per epoch; `cosine`: stepped every batch, a linear warm-up over --warmup_epochs then
    cosine decay to zero at the last step of the `budget`'s epochs (default --num_epochs)."""
    if training.scheduler == 'step':
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=training.step_size, gamma=training.gamma)
    if training.scheduler == 'cosine':
        budget = budget or Budget(training.num_epochs)
        per_epoch = len(full_batches(n_train, batch_size))
        warmup = training.warmup_epochs * per_epoch

        def factor(step):
            if step < warmup:
                return (step + 1) / (warmup + 1)
            total = budget.epochs * per_epoch
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return None


def make_average(training, decoder):
    """--ema: an exponential moving average of the decoder's weights (and BatchNorm statistics), which the attack
    then uses; None when off."""
    if not training.ema:
        return None
    return AveragedModel(decoder, multi_avg_fn=get_ema_multi_avg_fn(training.ema), use_buffers=True)


@torch.no_grad()
def cache_features(attack, images, indices, batch_size, max_bytes):
    """The victim's clean features for images[indices], computed once; None when they would not fit."""
    shape = attack.encode(attack.to_images(images[indices[:1]])).shape[1:]
    size = len(indices) * shape.numel() * 4
    if size > max_bytes:
        print(f'feature cache skipped: {size / 2**30:.1f} GiB > --feature_cache_gb')
        return None
    on_device = attack.device.type == 'cpu' or size < torch.cuda.mem_get_info(attack.device)[0] // 4
    layout = {'memory_format': torch.channels_last} if len(shape) == 3 else {}  # as the encoder computes maps
    cache = torch.empty(len(indices), *shape, device=attack.device if on_device else 'cpu', pin_memory=not on_device,
                        **layout)
    for start in progress(range(0, len(indices), batch_size), desc='caching victim features'):
        cache[start:start + batch_size] = attack.encode(attack.to_images(images[indices[start:start + batch_size]]))
    return cache


def reconstruction_loss(recon, images, kind):
    """--loss against the [0, 1] image: pixel MSE, L1, 1 - SSIM, or 0.84 (1 - SSIM) + 0.16 L1."""
    if kind == 'mse':
        return F.mse_loss(recon, images)
    l1 = F.l1_loss(recon, images) if kind != 'ssim' else 0
    if kind == 'l1':
        return l1
    dissimilarity = 1 - ssim(recon.float(), images, data_range=1.0, win_size=11)
    return dissimilarity if kind == 'ssim' else MIX_SSIM_SHARE * dissimilarity + (1 - MIX_SSIM_SHARE) * l1


def training_loss(attack, recon, images, sent, activations, training):
    """--loss, plus the white-box feature-consistency term (--feature_weight: the frozen victim re-encodes the
    reconstruction, which should give back the sent tensor), plus the --sparse L1 penalty on the activations."""
    loss = reconstruction_loss(recon, images, training.loss)
    if training.feature_weight:
        loss = loss + training.feature_weight * feature_error(attack, recon, sent).mean()
    if training.sparse:
        loss = loss + training.sparse_reg * sum(a.abs().mean() for a in activations)
    return loss


def augment(images, generator):
    """The attacker's own data, varied: a random horizontal flip and a random square crop of 60-100 % of the
    side resized back, per image (seeded, so a resumed run sees the same batches)."""
    size = images.shape[-1]
    draws = torch.rand(len(images), 4, generator=generator).tolist()
    out = []
    for image, (flip, scale, left, top) in zip(images, draws):
        side = max(2, round(size * (AUGMENT_MIN_SCALE + (1 - AUGMENT_MIN_SCALE) * scale)))
        crop = TF.resized_crop(image, int(top * (size - side)), int(left * (size - side)), side, side, [size, size],
                               antialias=True)
        out.append(crop.flip(-1) if flip < 0.5 else crop)
    return torch.stack(out).clamp_(0, 1).contiguous(memory_format=torch.channels_last)


class StopRequest:
    """Ctrl-C / SIGTERM while training: finish the current step, then stop and save. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.signal, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f'\n{self.signal}: stopping after this step and saving (Ctrl-C again to abort at once)', flush=True)

    def requested(self, step=0):
        """Under torchrun every process must stop at the same step: they agree every 10 steps."""
        if rank_and_world()[1] == 1:
            return self.signal is not None
        if step % 10:
            return False
        flag = torch.tensor(float(self.signal is not None), device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


class StoppedInEpoch(Exception):
    """Raised out of an epoch stopped on request; `progress` resumes it exactly."""

    def __init__(self, progress):
        super().__init__('stopped')
        self.progress = progress


class EpochPlan(NamedTuple):
    """What every epoch of a run shares: the recipe (a config.TrainConfig), the batch size, the noise the
    attacker's training images get (a config.Noise or None), and the run's epochs (a Budget)."""
    training: object
    batch_size: int
    noise: object
    budget: Budget


def train_one_epoch(attack, splits, cache, plan, optimizer, epoch, stop=None, resume=None, batch_scheduler=None,
                    average=None):
    """One pass over the training split; returns the mean training loss.

    The data order is a permutation seeded by (seed, epoch) and the noise and masks come from generators
    (noise.training_draws) whose states are saved, so a run stopped mid-epoch (`stop`) continues (`resume`) with
    exactly the batches and noise it would have seen. Under torchrun every process draws the same permutation and
    takes every world-th image of each global batch (as DistributedSampler does); DDP averages the gradients, so the
    step is the one of the whole --batch_size. `batch_scheduler` (cosine) steps after every batch; `average` (--ema)
    follows the weights."""
    attack.decoder.train()
    rank, world = rank_and_world()
    seed = plan.training.seed
    draws = training_draws(seed, epoch, rank, attack.device)
    batch_size, n = plan.batch_size, len(splits.train_idx)
    order = torch.randperm(n, generator=generator('data order', seed, epoch))
    starts = full_batches(n, batch_size)
    total, count, first = torch.zeros((), device=attack.device), 0, 0
    if resume is not None:  # each process goes on from its own running loss and random draws
        mine = resume['processes'][rank]
        total += mine['loss_sum']
        count, first = resume['count'], resume['step']
        draws.noise.set_state(mine['noise_rng'])
        if 'mask_rng' in mine:  # a checkpoint from before masks had their own stream goes on with a fresh one
            draws.masks.set_state(mine['mask_rng'])
    with progress(starts[first:], desc=f'epoch {epoch + 1}/{plan.budget.epochs}') as bar:
        for step, start in enumerate(bar, start=first):
            positions = order[start:start + batch_size][rank::world]
            images = attack.to_images(splits.images[splits.train_idx[positions]])
            if plan.training.augment:  # new images: the attacker queries the device's half for their features
                images = augment(images, generator('augment', seed, epoch, step, rank))
            if cache is None:
                features = attack.encode(images, plan.noise, draws)
            else:
                features = cache[positions.to(cache.device)].to(attack.device, non_blocking=True)
            features = attack.defend(features, plan.noise, draws)
            activations = [] if plan.training.sparse else None
            recon = attack.decode(features, activations, training=True)
            loss = training_loss(attack, recon, images, features, activations, plan.training)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if batch_scheduler is not None:
                batch_scheduler.step()
            if average is not None:
                average.update_parameters(attack.decoder)
            total += loss.detach()
            count += 1
            if step % 10 == 0 or step == len(starts) - 1:  # a host sync only now and then
                mean_loss = (mean_over_processes(total) / count).item()
                if not math.isfinite(mean_loss):
                    raise RunError(f'the training loss became {mean_loss} in epoch {epoch + 1} at a learning rate '
                                   f'of {optimizer.param_groups[0]["lr"]:g}; lower --lr (or --gamma) — checkpoints '
                                   f'written so far are intact')
                bar.set_postfix(loss=f'{mean_loss:.4f}')
            if stop is not None and step < len(starts) - 1 and stop.requested(step):
                mine = {'loss_sum': total.item(), 'noise_rng': draws.noise.get_state().cpu(),
                        'mask_rng': draws.masks.get_state().cpu()}
                raise StoppedInEpoch({'step': step + 1, 'of': len(starts), 'count': count,
                                      'processes': gather_from_processes(mine)})
    return mean_loss


class BestWeights:
    """--stop_patience: the attacking decoder's weights of the epoch with the highest PSNR on the stopping images
    (never the reported ones; ties: the earliest); the attack uses them once training stops, as an attacker who
    watched a held-out set of its own would."""

    def __init__(self):
        self.epoch, self.value, self.decoder = 0, None, None

    def offer(self, decoder, epoch, value):
        if self.value is None or value > self.value:
            self.epoch, self.value = epoch, value
            self.decoder = {k: v.detach().clone() for k, v in decoder.state_dict().items()}

    def state_dict(self):
        return {'epoch': self.epoch, 'value': self.value, 'decoder': self.decoder}

    def load_state_dict(self, state, history):
        """`history`: the run's, where a checkpoint from before the value was stored holds it."""
        self.epoch, self.decoder = state['epoch'], state['decoder']
        self.value = state['value'] if 'value' in state else history[self.epoch - 1][STOP_KEY]


class Trainer(NamedTuple):
    """What a run's checkpoints carry besides the decoder: what training updates (saved in training checkpoints to go
    on exactly) and the mean training image, the baseline of every evaluation of the decoder."""
    optimizer: torch.optim.Optimizer
    scheduler: object  # an LRScheduler or None
    average: AveragedModel = None  # --ema
    best: BestWeights = None  # --stop_patience
    mean_image: torch.Tensor = None  # the mean training image, computed once a run: saved beside every decoder


def checkpoint(attack, splits, record, history, epoch, trainer, resumable=True):
    """'decoder' holds the weights the attack uses (the average with --ema) beside the run's `record`
    (records.to_record) and the mean training image (`trainer.mean_image`, the baseline of every later evaluation);
    a `resumable` one (ckpt_N.ckpt) also holds what goes on training."""
    average = trainer.average
    state = {'format': CHECKPOINT_FORMAT, 'config': record, 'epoch': epoch, 'history': history,
             'decoder': attacking_decoder(attack, average).state_dict(), 'data': splits.record(),
             'mean_image': trainer.mean_image}
    if resumable:
        state['optimizer'] = trainer.optimizer.state_dict()
        state['scheduler'] = trainer.scheduler.state_dict() if trainer.scheduler is not None else None
        if average is not None:
            state['trained_decoder'], state['average'] = attack.decoder.state_dict(), average.state_dict()
        if trainer.best is not None and trainer.best.decoder is not None:
            state['best'] = trainer.best.state_dict()
    elif trainer.best is not None and 0 < trainer.best.epoch < epoch:  # use_best_weights put them in the decoder
        state['weights_epoch'] = trainer.best.epoch
    return state


def attacking_decoder(attack, average):
    return average.module if average is not None else attack.decoder


def save_and_stop(attack, splits, record, save_dir, history, epoch, trainer, progress, reason):
    """interrupted.ckpt holds everything to go on exactly where training stopped (each process's running loss
    and noise generator included); then exit with the command."""
    path = os.path.join(save_dir, 'interrupted.ckpt')
    state = checkpoint(attack, splits, record, history, epoch, trainer)
    state['partial_epoch'] = progress
    save_if_main(save_torch, state, path)
    where = (f'in epoch {epoch + 1} after step {progress["step"]} of {progress["of"]}' if progress
             else f'after epoch {epoch}')
    raise Interrupted(f'{reason}: training stopped {where} and saved {path}; to go on: '
                      f'python main.py --resume --model_path {path}')


def validate(attack, splits, batch_size, noise, average=None, indices=None):
    """Metrics of the decoder the attack uses (the average with --ema) on the validation images (or `indices`), with
    the device's test `noise`; under torchrun each process scores a slice and rank 0's summary covers them all."""
    attack = attack.using(attacking_decoder(attack, average))
    indices = splits.val_idx if indices is None else indices
    rank, world = rank_and_world()
    if world == 1:
        return summarise(evaluate(attack, splits.images, indices, batch_size, noise, desc='validating'))
    for buffer in attack.decoder.buffers():  # BatchNorm running statistics as rank 0 has them
        dist.broadcast(buffer, 0)
    parts = indices.tensor_split(world)
    mine = evaluate(attack, splits.images, parts[rank], batch_size, noise, desc='validating',
                    first=sum(len(p) for p in parts[:rank]))
    slices = [None] * world
    dist.all_gather_object(slices, mine)
    return summarise({m: torch.cat([s[m] for s in slices]) for m in mine})


def history_row(epoch, train_loss, summary, optimizer, seconds, stopping=None):
    """An epoch's figures; with --stop_patience also the PSNR on the stopping images (`stopping`, a summary)."""
    return {'epoch': epoch, 'train_loss': train_loss, 'val_loss': summary['mse']['mean'],
            'psnr': summary['psnr']['mean'], 'ssim': summary['ssim']['mean'],
            'ms_ssim': summary['ms_ssim']['mean'], 'lr': optimizer.param_groups[0]['lr'], 'seconds': seconds,
            **({STOP_KEY: stopping['psnr']['mean']} if stopping else {})}


def distribute(attack, compile):
    """Under torchrun: the training step runs through DistributedDataParallel (SyncBatchNorm on CUDA; the CPU has
    none, so there each process normalises its own share of the batch)."""
    if rank_and_world()[1] == 1:
        return
    if attack.device.type == 'cuda':
        attack.decoder = nn.SyncBatchNorm.convert_sync_batchnorm(attack.decoder)
    ddp = DistributedDataParallel(attack.decoder, device_ids=[attack.device] if attack.device.type == 'cuda' else None)
    attack.decoder_step = torch.compile(ddp) if compile else ddp


def check_processes(resume_state):
    """A run stopped mid-epoch goes on only with as many processes as it had: each has its own state."""
    partial = (resume_state or {}).get('partial_epoch')
    if partial and len(partial['processes']) != rank_and_world()[1]:
        n = len(partial['processes'])
        raise UsageError(f'this checkpoint was stopped mid-epoch by {n} process(es): resume it with '
                         + (f'torchrun --nproc_per_node {n}' if n > 1 else 'a single process'))


def epochs_within(minutes, epoch_seconds):
    """--minutes: as many epochs as fit, judged by the first epoch's time (its training and validation); recorded
    with the run, so `--num_epochs N` repeats it exactly."""
    epochs = same_on_all_processes(max(1, int(minutes * 60 // epoch_seconds)))
    print(f'--minutes {minutes:g}: the first epoch took {epoch_seconds:.1f}s, so {epochs} epochs in all '
          f'(--num_epochs {epochs} repeats this run)')
    return epochs


class TrainedAttack(NamedTuple):
    """What training returns: the attack with the decoder it attacks with, its images, its per-epoch history, the
    baselines on its held-out images, what the run derived (a config.Derived), its configuration and the mean
    training image."""
    attack: object
    splits: object
    history: list
    baselines: dict
    derived: Derived
    config: object
    mean_image: torch.Tensor


def train(config, device, resume=None, derived=Derived(), splits=None):
    """Train (or go on training from the checkpoint `resume`) the decoder of the run a config.Config describes;
    writes metrics.json, ckpt_{epoch}.ckpt and model.pth into its save_dir. `derived`: what the run found before
    (a resumed checkpoint's); `splits`: its images where they are not config.data's (the Python API's own). Returns
    a TrainedAttack, its attack using the decoder it attacks with (the average of the weights with --ema, the best
    epoch's with --stop_patience)."""
    training, save_dir, batch_size = config.training, config.outputs.save_dir, config.data.batch_size
    os.makedirs(save_dir, exist_ok=True)
    check_processes(resume)
    if splits is None:
        splits = main_first(lambda: load_splits(config.data, resume and resume['data'], config.victim.weights,
                                                stopping=bool(training.stop_patience)))
    print(f'data: {splits.description}')
    attack, derived = build_attack(config, device, splits.calibration_images(batch_size), derived)
    noise = derived.noise(config.noise)
    print(f'attacker: {attacker_label(config.decoder, training.feature_weight)}; arithmetic: {attack.precision} '
          '(metrics in fp32)')
    distribute(attack, config.runtime.compile)
    budget = Budget(derived.epochs(training))
    optimizer = make_optimizer(training, attack.decoder.parameters(), device)
    trainer = Trainer(optimizer, make_scheduler(training, optimizer, len(splits.train_idx), batch_size, budget),
                      make_average(training, attack.decoder), BestWeights() if training.stop_patience else None,
                      mean_training_image(splits))
    baselines = {'mean_image': summarise(mean_image_baseline(trainer.mean_image, splits)),
                 'untrained_decoder': validate(attack, splits, batch_size, noise.testing())}
    history, start_epoch, partial = [], 0, None
    if resume is not None:
        history, start_epoch, partial = resume_training(attack, trainer, resume, budget.epochs)
    print(f'baselines on validation: mean image: {format_summary(baselines["mean_image"])}')
    print(f'                         untrained decoder: {format_summary(baselines["untrained_decoder"])}')
    print(msssim_note(config.data.image_size))

    no_input_noise = noise.training() is None or noise.at != 'input'
    cache = None
    if no_input_noise and not training.augment and training.feature_cache_gb > 0 and start_epoch < budget.epochs:
        cache = cache_features(attack, splits.images, splits.train_idx, batch_size, training.feature_cache_gb * 2**30)
    plan = EpochPlan(training, batch_size, noise.training(), budget)
    plateau = Plateau(training.stop_patience, training.stop_delta, STOP_KEY, history)
    sample = splits.validation()
    with StopRequest() as stop, live_curves(config, to_record(config, derived), sample, noise.testing(), budget,
                                            start_epoch) as curves:
        epoch = start_epoch
        while epoch < budget.epochs and not plateau.reached(epoch):  # --minutes may set the epochs after epoch 1
            started = time.time() - (partial or {}).get('seconds', 0.0)  # an epoch resumed: its time before too
            record = to_record(config, derived)
            try:
                train_loss = train_one_epoch(attack, splits, cache, plan, optimizer, epoch, stop, partial,
                                             trainer.scheduler if training.scheduler == 'cosine' else None,
                                             trainer.average)
            except StoppedInEpoch as stopped:
                save_and_stop(attack, splits, record, save_dir, history, epoch, trainer,
                              {**stopped.progress, 'seconds': time.time() - started}, stop.signal)
            partial = None
            if training.scheduler == 'step':
                trainer.scheduler.step()
            summary = validate(attack, splits, batch_size, noise.testing(), trainer.average)
            stopping = (validate(attack, splits, batch_size, noise.testing(), trainer.average, splits.stop_idx)
                        if plateau.patience else None)
            history.append(history_row(epoch + 1, train_loss, summary, optimizer, time.time() - started, stopping))
            plateau.update(history[-1])
            if trainer.best is not None:
                trainer.best.offer(attacking_decoder(attack, trainer.average), epoch + 1, history[-1][STOP_KEY])
            if curves is not None:
                curves.log(epoch + 1, {tag: history[-1][key] for key, tag in CURVES.items()})
                curves.reconstructions(epoch + 1, attack.using(attacking_decoder(attack, trainer.average)))
            print(f'epoch {epoch + 1}/{budget.epochs}: train loss {train_loss:.5f}  val loss '
                  f'{summary["mse"]["mean"]:.5f}  {format_summary(summary)}  ({time.time() - started:.1f}s)')
            if epoch == 0 and training.minutes and derived.num_epochs is None:  # a resumed first epoch too
                budget.epochs = epochs_within(training.minutes, history[0]['seconds'])
                derived = dataclasses.replace(derived, num_epochs=budget.epochs)
                record = to_record(config, derived)
            save_if_main(save_json, {'config': record, 'baselines': baselines, 'history': history},
                         os.path.join(save_dir, 'metrics.json'))
            last = epoch + 1 == budget.epochs or plateau.reached(epoch + 1)
            if (epoch + 1) % training.log_interval == 0 or last:
                save_if_main(save_torch, checkpoint(attack, splits, record, history, epoch + 1, trainer),
                             os.path.join(save_dir, f'ckpt_{epoch + 1}.ckpt'))
            if not last and stop.requested():
                save_and_stop(attack, splits, record, save_dir, history, epoch + 1, trainer, None, stop.signal)
            epoch += 1
    if plateau.patience:
        print(stopping_note(plateau.record(len(history), budget.epochs)))
        use_best_weights(attack, trainer, len(history))
    save_if_main(save_torch, checkpoint(attack, splits, to_record(config, derived), history, len(history), trainer,
                                        resumable=False), os.path.join(save_dir, 'model.pth'))
    return TrainedAttack(attack.using(attacking_decoder(attack, trainer.average)), splits, history, baselines, derived,
                         config, trainer.mean_image)


def use_best_weights(attack, trainer, epochs):
    """The stopping rule's best epoch's weights into the attacking decoder (and so into model.pth)."""
    best = trainer.best
    if best.decoder is not None and best.epoch < epochs:
        attacking_decoder(attack, trainer.average).load_state_dict(best.decoder)
        print(f'the attack uses the decoder of epoch {best.epoch}, the highest PSNR on the stopping images '
              f'({best.value:.2f} dB)')


def train_and_evaluate(config, device, resume=None, derived=Derived()):
    """--train / --resume: train (or go on), then the full evaluation of the held-out images, every figure, and
    the --attack chosen where it is not the decoder alone."""
    trained = train(config, device, resume, derived)
    if not is_main_process():
        return
    attack, derived, mean_image = trained.attack, trained.derived, trained.mean_image
    noise = derived.noise(config.noise)
    validation = trained.splits.validation()
    bound = run_bound(attack, noise, trained.splits.calibration_images(PRIOR_IMAGES), config.training.seed)
    per_image, _ = evaluate_and_report(attack, validation, config, derived, {'epoch': len(trained.history)},
                                       history=trained.history, bound=bound, mean_image=mean_image)
    draw_all(attack, validation, config, derived, trained.history, config.outputs.save_dir, per_image, mean_image)
    if config.attack.kind != 'decoder':
        run_attack(attack, validation, config, derived, history=trained.history, bound=bound, mean_image=mean_image)


def resume_training(attack, trainer, state, epochs):
    """Weights, optimizer, schedule and average as the checkpoint left them; returns (history, epoch, partial)."""
    attack.decoder.load_state_dict(state['trained_decoder'] if trainer.average is not None else state['decoder'])
    trainer.optimizer.load_state_dict(state['optimizer'])
    if trainer.scheduler is not None and state.get('scheduler'):
        trainer.scheduler.load_state_dict(state['scheduler'])
    if trainer.average is not None:
        trainer.average.load_state_dict(state['average'])
    if trainer.best is not None and state.get('best'):
        trainer.best.load_state_dict(state['best'], state['history'])
    partial = state.get('partial_epoch')
    print(f'resuming epoch {state["epoch"] + 1} of {epochs}'
          + (f' at step {partial["step"] + 1} of {partial["of"]}' if partial else ''))
    return list(state['history']), state['epoch'], partial
