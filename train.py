"""Training: the attacker's decoder on what crosses the cut (checkpoints carry all that rebuilds the attack), and
--train_defence's defended victims."""
import copy
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

from data import full_batches, load_splits
from defences import (DEFENCE_RECORD, DEFENCES, DEFENDED_FILE, TRAINING_KEYS, SimulatedAttacker, build_attack,
                      distance_correlation)
from evaluate import (STOP_KEY, UTILITY, AttackPlan, Plateau, evaluate, evaluate_and_report, format_summary,
                      mean_image_baseline, msssim_note, summarise)
from fisher import Bound
from models import (DEFENDED_FORMAT, SplitAttack, SplitVictim, attacker_label, cut, feature_error, feature_shape,
                    load_network, test_noise, train_noise)
from utils import (Interrupted, RunError, UsageError, is_main_process, progress, provenance, rank_and_world,
                   same_on_all_processes, save_json, save_torch, to_unit)
from visualize import draw_all, live_curves, plot_defence_history, run_attack

# 2: the images trained on and held out are recorded; 3: --decoder and recipe; 4: --split_seed and --victim_seed
CHECKPOINT_FORMAT = 'recon-attack/4'
LOSSES = ('mse', 'l1', 'ssim', 'mix')
MIX_SSIM_SHARE = 0.84  # --loss mix: 0.84 (1 - SSIM) + 0.16 L1, the mix of Zhao et al. 2017 (IEEE TCI)
AUGMENT_MIN_SCALE = 0.6  # --augment crops keep 60-100 % of the image side
# --tensorboard's scalar of each column of the training history
CURVES = {'train_loss': 'loss/train', 'val_loss': 'loss/validation_mse', 'psnr': 'validation/psnr_db',
          'ssim': 'validation/ssim', 'ms_ssim': 'validation/ms_ssim', 'lr': 'learning_rate',
          'seconds': 'time/epoch_seconds'}


def make_optimizer(cfg, params, device):
    fused = {'fused': True} if device.type == 'cuda' else {}
    if cfg['optim'] == 'sgd':
        return torch.optim.SGD(params, lr=cfg['lr'], momentum=0.9, weight_decay=cfg['weight_decay'])
    optimizer = {'adam': torch.optim.Adam, 'adamw': torch.optim.AdamW}[cfg['optim']]
    return optimizer(params, lr=cfg['lr'], weight_decay=cfg['weight_decay'], **fused)


def steps_per_epoch(cfg, n_train):
    return len(full_batches(n_train, cfg['batch_size']))


def make_scheduler(cfg, optimizer, n_train):
    """`step`: stepped once per epoch; `cosine`: stepped every batch, a linear warm-up over --warmup_epochs then
    cosine decay to zero at the last step."""
    if cfg['scheduler'] == 'step':
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg['step_size'], gamma=cfg['gamma'])
    if cfg['scheduler'] == 'cosine':
        per_epoch = steps_per_epoch(cfg, n_train)
        warmup = cfg['warmup_epochs'] * per_epoch

        def factor(step):  # reads num_epochs when called: --minutes sets it after the first epoch
            if step < warmup:
                return (step + 1) / (warmup + 1)
            total = cfg['num_epochs'] * per_epoch
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return None


def make_average(cfg, decoder):
    """--ema: an exponential moving average of the decoder's weights (and BatchNorm statistics), which the attack
    then uses; None when off."""
    if not cfg['ema']:
        return None
    return AveragedModel(decoder, multi_avg_fn=get_ema_multi_avg_fn(cfg['ema']), use_buffers=True)


@torch.no_grad()
def cache_features(attack, images, indices, batch_size, max_bytes):
    """The victim's clean features for images[indices], computed once; None when they would not fit."""
    shape = attack.encode(attack.to_images(images[indices[:1]])).shape[1:]
    size = len(indices) * shape.numel() * 4
    if size > max_bytes:
        print(f'feature cache skipped: {size / 2**30:.1f} GiB > --feature_cache_gb')
        return None
    on_device = attack.device.type == 'cpu' or size < torch.cuda.mem_get_info(attack.device)[0] // 4
    cache = torch.empty(len(indices), *shape, device=attack.device if on_device else 'cpu',
                        pin_memory=not on_device, memory_format=torch.channels_last)
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


def training_loss(attack, recon, images, sent, activations, cfg):
    """--loss, plus the white-box feature-consistency term (--feature_weight: the frozen victim re-encodes the
    reconstruction, which should give back the sent tensor), plus the --sparse L1 penalty on the activations."""
    loss = reconstruction_loss(recon, images, cfg['loss'])
    if cfg['feature_weight']:
        loss = loss + cfg['feature_weight'] * feature_error(attack, recon, sent).mean()
    if cfg['sparse']:
        loss = loss + cfg['sparse_reg'] * sum(a.abs().mean() for a in activations)
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


def gather_from_processes(value):
    """[each torchrun process's `value`] in rank order ([value] in a single process)."""
    if rank_and_world()[1] == 1:
        return [value]
    gathered = [None] * rank_and_world()[1]
    dist.all_gather_object(gathered, value)
    return gathered


def mean_over_processes(value):
    """A tensor's mean over the torchrun processes (itself in a single process)."""
    if rank_and_world()[1] > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= rank_and_world()[1]
    return value


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


def batch_generator(cfg, epoch, step, rank):
    """The random draws of one process's batch (--augment), seeded by its position: a resumed run redraws them."""
    return torch.Generator().manual_seed(((cfg['seed'] * 1000 + epoch) * 100_000 + step) * 64 + rank)


def train_one_epoch(attack, splits, cache, cfg, optimizer, epoch, stop=None, resume=None, batch_scheduler=None,
                    average=None):
    """One pass over the training split; returns the mean training loss.

    The data order is a permutation seeded by (seed, epoch) and the noise comes from a generator whose state is
    saved, so a run stopped mid-epoch (`stop`) continues (`resume`) with exactly the batches and noise it would
    have seen. Under torchrun every process draws the same permutation and takes every world-th image of each
    global batch (as DistributedSampler does); DDP averages the gradients, so the step is the one of the whole
    --batch_size. `batch_scheduler` (cosine) steps after every batch; `average` (--ema) follows the weights."""
    attack.decoder.train()
    rank, world = rank_and_world()
    noise = train_noise(cfg)
    data_order = torch.Generator().manual_seed(cfg['seed'] * 1000 + epoch)
    noise_rng = attack.noise_generator(cfg['seed'] * 1000 + epoch + 100_003 * rank)
    batch_size, n = cfg['batch_size'], len(splits.train_idx)
    order = torch.randperm(n, generator=data_order)
    starts = full_batches(n, batch_size)
    total, count, first = torch.zeros((), device=attack.device), 0, 0
    if resume is not None:  # each process goes on from its own running loss and noise generator
        mine = resume['processes'][rank]
        total += mine['loss_sum']
        count, first = resume['count'], resume['step']
        noise_rng.set_state(mine['noise_rng'])
    with progress(starts[first:], desc=f'epoch {epoch + 1}/{cfg["num_epochs"]}') as bar:
        for step, start in enumerate(bar, start=first):
            positions = order[start:start + batch_size][rank::world]
            images = attack.to_images(splits.images[splits.train_idx[positions]])
            if cfg['augment']:  # new images: the attacker queries the device's half for their features
                images = augment(images, batch_generator(cfg, epoch, step, rank))
            if cache is None:
                features = attack.encode(images, noise, noise_rng)
            else:
                features = cache[positions.to(cache.device)].to(attack.device, non_blocking=True)
            features = attack.defend(features, noise, noise_rng)
            activations = [] if cfg['sparse'] else None
            recon = attack.decode(features, activations, training=True)
            loss = training_loss(attack, recon, images, features, activations, cfg)
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
                mine = {'loss_sum': total.item(), 'noise_rng': noise_rng.get_state().cpu()}
                raise StoppedInEpoch({'step': step + 1, 'of': len(starts), 'count': count,
                                      'processes': gather_from_processes(mine)})
    return mean_loss


class BestWeights:
    """--stop_patience: the attacking decoder's weights at the stopping rule's best epoch, chosen on the stopping
    images (never the reported ones); the attack uses them once training stops, as an attacker who watched a
    held-out set of its own would."""

    def __init__(self):
        self.epoch, self.decoder = 0, None

    def keep(self, decoder, epoch):
        self.epoch, self.decoder = epoch, {k: v.detach().clone() for k, v in decoder.state_dict().items()}

    def state_dict(self):
        return {'epoch': self.epoch, 'decoder': self.decoder}

    def load_state_dict(self, state):
        self.epoch, self.decoder = state['epoch'], state['decoder']


class Trainer(NamedTuple):
    """What training updates besides the decoder: saved in training checkpoints to go on exactly."""
    optimizer: torch.optim.Optimizer
    scheduler: object  # an LRScheduler or None
    average: AveragedModel = None  # --ema
    best: BestWeights = None  # --stop_patience


def checkpoint(attack, splits, cfg, history, epoch, trainer, resumable=True):
    """'decoder' holds the weights the attack uses (the average with --ema); a `resumable` one (ckpt_N.ckpt)
    also holds what goes on training."""
    average = trainer.average
    state = {'format': CHECKPOINT_FORMAT, 'config': cfg, 'epoch': epoch, 'history': history,
             'decoder': attacking_decoder(attack, average).state_dict(), 'data': splits.record()}
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


def save_and_stop(attack, splits, cfg, history, epoch, trainer, progress, reason):
    """interrupted.ckpt holds everything to go on exactly where training stopped (each process's running loss
    and noise generator included); then exit with the command."""
    path = os.path.join(cfg['save_dir'], 'interrupted.ckpt')
    state = checkpoint(attack, splits, cfg, history, epoch, trainer)
    state['partial_epoch'] = progress
    save_if_main(save_torch, state, path)
    where = f'in epoch {epoch + 1} after step {progress["step"]} of {progress["of"]}' if progress else f'after epoch {epoch}'
    raise Interrupted(f'{reason}: training stopped {where} and saved {path}; to go on: '
                      f'python main.py --resume --model_path {path}')


def validate(attack, splits, cfg, average=None, indices=None):
    """Metrics of the decoder the attack uses (the average with --ema) on the validation images (or `indices`);
    under torchrun each process scores a slice and rank 0's summary covers them all."""
    attack = attack.using(attacking_decoder(attack, average))
    indices = splits.val_idx if indices is None else indices
    rank, world = rank_and_world()
    if world == 1:
        return summarise(evaluate(attack, splits.images, indices, cfg['batch_size'], test_noise(cfg),
                                  desc='validating'))
    for buffer in attack.decoder.buffers():  # BatchNorm running statistics as rank 0 has them
        dist.broadcast(buffer, 0)
    parts = indices.tensor_split(world)
    mine = evaluate(attack, splits.images, parts[rank], cfg['batch_size'], test_noise(cfg), desc='validating',
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


def load_splits_once(cfg, record=None):
    """Under torchrun rank 0 decodes the images into the cache first; the other processes then read it."""
    distributed, main = rank_and_world()[1] > 1, is_main_process()
    if distributed and not main:
        dist.barrier()
    splits = load_splits(cfg, record)
    if distributed and main:
        dist.barrier()
    return splits


def distribute(attack, cfg):
    """Under torchrun: the training step runs through DistributedDataParallel (SyncBatchNorm on CUDA; the CPU has
    none, so there each process normalises its own share of the batch)."""
    if rank_and_world()[1] == 1:
        return
    if attack.device.type == 'cuda':
        attack.decoder = nn.SyncBatchNorm.convert_sync_batchnorm(attack.decoder)
    ddp = DistributedDataParallel(attack.decoder, device_ids=[attack.device] if attack.device.type == 'cuda' else None)
    attack.decoder_step = torch.compile(ddp) if cfg.get('compile') else ddp


def save_if_main(save, obj, path):
    if is_main_process():
        save(obj, path)


def check_processes(resume_state):
    """A run stopped mid-epoch goes on only with as many processes as it had: each has its own state."""
    partial = (resume_state or {}).get('partial_epoch')
    if partial and len(partial['processes']) != rank_and_world()[1]:
        n = len(partial['processes'])
        raise UsageError(f'this checkpoint was stopped mid-epoch by {n} process(es): resume it with '
                         + (f'torchrun --nproc_per_node {n}' if n > 1 else 'a single process'))


def train(cfg, device, resume_state=None):
    """Train (or resume) the decoder; writes metrics.json, ckpt_{epoch}.ckpt and model.pth into cfg['save_dir'].
    Returns the attack with the decoder it attacks with (the average of the weights with --ema)."""
    save_dir = cfg['save_dir']
    os.makedirs(save_dir, exist_ok=True)
    check_processes(resume_state)
    splits = load_splits_once(cfg, resume_state and resume_state['data'])
    print(f'data: {splits.description}')
    attack = build_attack(cfg, device, splits.calibration_images(cfg['batch_size']))
    cfg['victim_fingerprint'] = attack.victim.fingerprint()
    print(f'attacker: {attacker_label(cfg)}; arithmetic: {attack.precision} (metrics in fp32)')
    distribute(attack, cfg)
    optimizer = make_optimizer(cfg, attack.decoder.parameters(), device)
    trainer = Trainer(optimizer, make_scheduler(cfg, optimizer, len(splits.train_idx)),
                      make_average(cfg, attack.decoder), BestWeights() if cfg['stop_patience'] else None)
    baselines = {'mean_image': summarise(mean_image_baseline(splits)), 'untrained_decoder': validate(attack, splits, cfg)}
    history, start_epoch, partial = [], 0, None
    if resume_state is not None:
        history, start_epoch, partial = resume_training(attack, trainer, resume_state, cfg)
    print(f'baselines on validation: mean image: {format_summary(baselines["mean_image"])}')
    print(f'                         untrained decoder: {format_summary(baselines["untrained_decoder"])}')
    print(msssim_note(cfg['image_size']))

    no_input_noise = train_noise(cfg) is None or train_noise(cfg).at != 'input'
    cache = None
    if no_input_noise and not cfg['augment'] and cfg['feature_cache_gb'] > 0 and start_epoch < cfg['num_epochs']:
        cache = cache_features(attack, splits.images, splits.train_idx, cfg['batch_size'],
                               cfg['feature_cache_gb'] * 2**30)
    plateau = Plateau(cfg['stop_patience'], cfg['stop_delta'], STOP_KEY, history)
    with StopRequest() as stop, live_curves(cfg, splits.validation(), start_epoch) as curves:
        epoch = start_epoch
        while epoch < cfg['num_epochs'] and not plateau.reached(epoch):  # --minutes may set num_epochs after epoch 1
            started = time.time()
            try:
                train_loss = train_one_epoch(attack, splits, cache, cfg, optimizer, epoch, stop, partial,
                                             trainer.scheduler if cfg['scheduler'] == 'cosine' else None,
                                             trainer.average)
            except StoppedInEpoch as stopped:
                save_and_stop(attack, splits, cfg, history, epoch, trainer, stopped.progress, stop.signal)
            partial = None
            if cfg['scheduler'] == 'step':
                trainer.scheduler.step()
            summary = validate(attack, splits, cfg, trainer.average)
            stopping = validate(attack, splits, cfg, trainer.average, splits.stop_idx) if plateau.patience else None
            history.append(history_row(epoch + 1, train_loss, summary, optimizer, time.time() - started, stopping))
            plateau.update(history[-1])
            if plateau.best_epoch == epoch + 1 and trainer.best is not None:
                trainer.best.keep(attacking_decoder(attack, trainer.average), epoch + 1)
            if curves is not None:
                curves.log(epoch + 1, {tag: history[-1][key] for key, tag in CURVES.items()})
                curves.reconstructions(epoch + 1, attack.using(attacking_decoder(attack, trainer.average)))
            print(f'epoch {epoch + 1}/{cfg["num_epochs"]}: train loss {train_loss:.5f}  val loss '
                  f'{summary["mse"]["mean"]:.5f}  {format_summary(summary)}  ({time.time() - started:.1f}s)')
            if epoch == 0 and cfg['minutes'] and resume_state is None:
                fit_to_budget(cfg, history[0]['seconds'])
            save_if_main(save_json, {'config': cfg, 'baselines': baselines, 'history': history},
                         os.path.join(save_dir, 'metrics.json'))
            last = epoch + 1 == cfg['num_epochs'] or plateau.reached(epoch + 1)
            if (epoch + 1) % cfg['log_interval'] == 0 or last:
                save_if_main(save_torch, checkpoint(attack, splits, cfg, history, epoch + 1, trainer),
                             os.path.join(save_dir, f'ckpt_{epoch + 1}.ckpt'))
            if not last and stop.requested():
                save_and_stop(attack, splits, cfg, history, epoch + 1, trainer, None, stop.signal)
            epoch += 1
    if plateau.patience:
        print(stopping_note(plateau.record(len(history), cfg['num_epochs'])))
        use_best_weights(attack, trainer, len(history))
    save_if_main(save_torch, checkpoint(attack, splits, cfg, history, len(history), trainer, resumable=False),
                 os.path.join(save_dir, 'model.pth'))
    return attack.using(attacking_decoder(attack, trainer.average)), splits, history, baselines


def use_best_weights(attack, trainer, epochs):
    """The stopping rule's best epoch's weights into the attacking decoder (and so into model.pth)."""
    best = trainer.best
    if best.decoder is not None and best.epoch < epochs:
        attacking_decoder(attack, trainer.average).load_state_dict(best.decoder)
        print(f'the attack uses the decoder of epoch {best.epoch}, the best on the stopping images')


def stopping_note(record, what='training'):
    """The log's line on what stopped `what` (training, defence training): a plateau of its figure, or the cap."""
    figure = ('the PSNR on the stopping images', 'dB') if record['on'] == STOP_KEY else (
        'its objective (KL + privacy term)', 'of itself')
    last = f'{figure[0]} last improved by {record["delta"]:g} {figure[1]} at epoch {record["best_epoch"]}'
    if record['plateau_reached']:
        return f'{what} stopped after epoch {record["epochs"]}: {last}, {record["patience"]} epochs before'
    return f'the cap of {record["epochs"]} epochs stopped {what} before a plateau ({last}): it may still improve'


def train_and_evaluate(cfg, device, resume_state=None):
    """--train / --resume: train (or go on), then the full evaluation of the held-out images, every figure, and
    the --attack chosen where it is not the decoder alone."""
    attack, splits, history, _ = train(cfg, device, resume_state)
    if not is_main_process():
        return
    validation, bound = splits.validation(), Bound(attack, cfg)
    per_image, _ = evaluate_and_report(attack, validation, cfg, {'epoch': len(history)}, history=history, bound=bound)
    draw_all(attack, validation, cfg, history, cfg['save_dir'], per_image['psnr'])
    if cfg['attack'] != 'decoder':
        run_attack(attack, validation, cfg, history=history, bound=bound)


def fit_to_budget(cfg, epoch_seconds):
    """--minutes: as many epochs as fit, judged by the first epoch's time (its training and validation); the
    number is recorded in the configuration, so `--num_epochs N` repeats the run exactly."""
    cfg['num_epochs'] = same_on_all_processes(max(1, int(cfg['minutes'] * 60 // epoch_seconds)))
    print(f'--minutes {cfg["minutes"]:g}: the first epoch took {epoch_seconds:.1f}s, so {cfg["num_epochs"]} '
          f'epochs in all (--num_epochs {cfg["num_epochs"]} repeats this run)')


def resume_training(attack, trainer, state, cfg):
    """Weights, optimizer, schedule and average as the checkpoint left them; returns (history, epoch, partial)."""
    attack.decoder.load_state_dict(state['trained_decoder'] if trainer.average is not None else state['decoder'])
    trainer.optimizer.load_state_dict(state['optimizer'])
    if trainer.scheduler is not None and state.get('scheduler'):
        trainer.scheduler.load_state_dict(state['scheduler'])
    if trainer.average is not None:
        trainer.average.load_state_dict(state['average'])
    if trainer.best is not None and state.get('best'):
        trainer.best.load_state_dict(state['best'])
    partial = state.get('partial_epoch')
    print(f'resuming epoch {state["epoch"] + 1} of {cfg["num_epochs"]}'
          + (f' at step {partial["step"] + 1} of {partial["of"]}' if partial else ''))
    return list(state['history']), state['epoch'], partial


def trainable_victim(cfg):
    """A copy of the victim to fine-tune (gradients to the device's half, and the server's with --defend_server)
    and its frozen original, the reference for agreement."""
    net, record = load_network(cfg['arch'], cfg['pretrained'], cfg['weights'], cfg['victim_seed'])
    if record is not None:
        raise UsageError(f'--weights {cfg["weights"]} is already a defended victim; defend the original instead')
    reference = SplitVictim(*cut(copy.deepcopy(net), cfg['arch'], cfg['split']))
    student = SplitVictim(*cut(net, cfg['arch'], cfg['split']), frozen=False)
    student.tail.requires_grad_(cfg['defend_server'])
    return net, student, reference


def parameter_groups(student, net, lr):
    """The victim's own weights (`net`'s) at --defend_lr; layers the defence adds, new, at 10x."""
    inherited = {id(p) for p in net.parameters()}
    trainable = [p for p in student.parameters() if p.requires_grad]
    return [{'params': [p for p in trainable if id(p) in inherited], 'lr': lr},
            {'params': [p for p in trainable if id(p) not in inherited], 'lr': 10 * lr}]


def kl_to_reference(logits, reference_logits):
    """KL(original || defended) per batch, in nats: the distillation term, with no labels needed."""
    return F.kl_div(logits.log_softmax(1), reference_logits.log_softmax(1), log_target=True, reduction='batchmean')


def defence_epoch(student, reference, term, optimizer, splits, cfg, device, generator, desc='defence training'):
    """One pass over the training split in full batches; the mean distillation and privacy losses."""
    order = splits.train_idx[torch.randperm(len(splits.train_idx), generator=generator)]
    starts = full_batches(len(order), cfg['batch_size'])
    totals = torch.zeros(2, device=device)  # summed on the device: no host sync per step
    for start in progress(starts, desc=desc):
        images = to_unit(splits.images[order[start:start + cfg['batch_size']]].to(device))
        with torch.no_grad():
            target = reference.classify(reference.encode(images))
        sent = student.encode(images)
        kl = kl_to_reference(student.classify(sent), target)
        privacy = term(images, sent) if term is not None else torch.zeros((), device=device)
        optimizer.zero_grad(set_to_none=True)
        (kl + privacy).backward()
        optimizer.step()
        totals += torch.stack([kl.detach(), privacy.detach()])
    kl, privacy = (totals / len(starts)).tolist()
    return {'kl': kl, 'privacy': privacy}


def batch_dependence(images, sent, positions, recon):
    """The distance correlation between a batch of images and the tensor sent for them, for each image."""
    return {'distance_correlation': distance_correlation(images, sent).expand(len(images))}


def held_out_utility(student, reference, splits, cfg, device, attacker=None):
    """Means over the held-out images, measured by the evaluation every attack gets (the same precision, the same
    path): the defended victim's agreement with the original, the distance correlation between those images and
    the tensor it sends (batch by batch), and the PSNR of the adversarial defence's own `attacker` where given."""
    measured_by = SplitAttack(student, attacker.decoder if attacker else None, device, cfg['precision'] == 'bf16')
    measured_by.charge_against(reference)
    measured = evaluate(measured_by, splits.images, splits.val_idx, cfg['batch_size'], desc='held-out utility',
                        utility=True, plan=AttackPlan() if attacker else None, measures=[batch_dependence])
    if attacker is not None:  # the decoder it was trained against: kept apart, under a name of its own
        measured = {**{k: measured[k] for k in (*UTILITY, 'distance_correlation')},
                    'simulated_attacker_psnr': measured['psnr']}
    return {name: values.mean().item() for name, values in measured.items()}


def defended_record(cfg, defence, net, student, splits):
    """What --weights loads: the fine-tuned network, any bottleneck, and what was done (the defence and defence
    training's settings, the images it was fine-tuned on, and the original victim, the reference its predictions
    are charged against)."""
    narrow = student.encoder[1] if defence.name == 'bottleneck' else None
    return {'format': DEFENDED_FORMAT, 'arch': cfg['arch'], 'split': cfg['split'], 'state_dict': net.state_dict(),
            'bottleneck': None if narrow is None else {
                'channels': narrow.in_channels, 'narrow': narrow.out_channels, 'squeeze': narrow.state_dict(),
                'expand': student.tail[0].state_dict()},
            'kind': defence.name, 'strength': cfg[defence.flag], 'label': f'trained defence: {defence.describe(cfg)}',
            'training': {key: cfg[key] for key in TRAINING_KEYS}, 'data': splits.record(),
            'reference': {'pretrained': cfg['pretrained'], 'seed': cfg['victim_seed'],
                          'weights': os.path.abspath(cfg['weights']) if cfg['weights'] else None}}


def train_defence(cfg, device):
    """--train_defence KIND: fine-tune the victim with the defence's privacy term beside distillation to the original,
    then write defended_victim.pth (for --weights) and defence.json (settings, per-epoch losses, held-out
    utility, time). Its privacy is measured by attacking it afresh, never by its own simulated attacker."""
    defence = DEFENCES[cfg['train_defence']]
    splits = load_splits(cfg)
    net, student, reference = trainable_victim(cfg)
    reference, student = reference.to(device), student.to(device)
    with torch.no_grad():
        calibration = student.encode(to_unit(splits.calibration_images(256).to(device)))
    student = defence.prepare(student, cfg[defence.flag], calibration)
    shape = feature_shape(student, cfg['image_size'])
    term = defence.privacy_term(cfg, shape, device, student)
    optimizer = torch.optim.Adam(parameter_groups(student, net, cfg['defend_lr']))
    before = held_out_utility(student, reference, splits, cfg, device)
    generator, history, started = torch.Generator().manual_seed(cfg['seed']), [], time.perf_counter()
    plateau = Plateau(cfg['stop_patience'], cfg['stop_delta'], 'objective', rising=False, relative=True)
    with live_curves(cfg, scored=None) as curves:
        for epoch in range(1, cfg['defend_epochs'] + 1):
            losses = defence_epoch(student, reference, term, optimizer, splits, cfg, device, generator,
                                   f'{defence.name} defence, epoch {epoch}/{cfg["defend_epochs"]}')
            history.append({'epoch': epoch, **losses, 'objective': losses['kl'] + losses['privacy'],
                            'seconds': time.perf_counter() - started})
            plateau.update(history[-1])
            if curves is not None:
                curves.log(epoch, {f'defence/{name}': value for name, value in losses.items()})
            if plateau.reached(epoch):
                break
    after = held_out_utility(student, reference, splits, cfg, device,
                             term if isinstance(term, SimulatedAttacker) else None)
    os.makedirs(cfg['save_dir'], exist_ok=True)
    path = os.path.join(cfg['save_dir'], DEFENDED_FILE)
    save_torch(defended_record(cfg, defence, net, student, splits), path)
    record = {'defence': defence.describe(cfg), 'sent_shape': list(shape), 'minutes': history[-1]['seconds'] / 60,
              'held_out': {'before': before, 'after': after, 'data': splits.description}, 'history': history,
              'config': cfg, 'weights': path, 'provenance': provenance(device)}
    if plateau.patience:
        record['stopping'] = plateau.record(len(history), cfg['defend_epochs'])
        print(stopping_note(record['stopping'], 'defence training'))
    plot_defence_history(history, defence.describe(cfg), os.path.join(cfg['save_dir'], 'defence.png'))
    if isinstance(term, SimulatedAttacker):
        record['simulated_attacker_note'] = ('held_out.after.simulated_attacker_psnr is the decoder it was trained '
                                             'against: not a privacy measure; attack the defended victim afresh')
    save_json(record, os.path.join(cfg['save_dir'], DEFENCE_RECORD))
    print(f'{defence.describe(cfg)}: {len(history)} epochs in {record["minutes"]:.1f} min; held-out top-1 '
          f'agreement with the original {after["top1_agreement"]:.3f}, KL {after["kl"]:.4f} nats, distance '
          f'correlation {before["distance_correlation"]:.3f} -> {after["distance_correlation"]:.3f}')
    print(f'defended victim: {path}; attack it with --train --arch {cfg["arch"]} --split {cfg["split"]} '
          f'--weights {path}')
    return record
