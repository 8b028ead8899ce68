"""Benchmark: the tool's training path against a reference loop written the straightforward way the original did
it (every JPEG decoded and resized in the DataLoader every epoch, fp32, NCHW, the victim run on every batch), in
one run, on the same data, settings, batch size and device.

    python bench.py                               # built-in photos, resnet18 / layer2, 64 px, batch 32
    python bench.py --image_size 128 --epochs 5
    python bench.py --data_dir ~/data/celeba --image_size 320 --batch_size 128 --num_batches 60

Reports train images/s of each path (median over the epochs after the first, which is warm-up), their ratio,
eval images/s, peak memory (CPU RSS; CUDA max allocated) and, on CUDA, the share of wall time the GPU was busy.
Prints a table and writes bench.json into --save_dir."""
import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from recon_attack import cli
from recon_attack.attacks import build_attack
from recon_attack.config import DecoderSpec
from recon_attack.data import builtin_splits, list_images, load_splits
from recon_attack.evaluate import evaluate
from recon_attack.models import DECODER_DEPTHS, DECODERS, IMAGENET_MEAN, IMAGENET_STD, build_victim
from recon_attack.train import Budget, EpochPlan, cache_features, make_optimizer, train_one_epoch
from recon_attack.utils import UsageError, fresh_run_dir, pick_device, progress, save_json

FP32_TOLERANCE, BF16_TOLERANCE = 1e-3, 3e-2  # relative difference allowed between the two first-batch losses


class ReferenceImages(Dataset):
    """The original's data path: open, decode, resize and crop each file every time it is read."""

    def __init__(self, paths, size):
        self.paths = paths
        self.transform = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                                    T.ToTensor()])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert('RGB'))


class Sampler:
    """Samples this process's resident memory and, on CUDA, the GPU's utilisation while a block runs."""

    def __init__(self, device):
        self.device, self.rss, self.gpu_busy = device, [], []
        self.stop = threading.Event()

    def __enter__(self):
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def sample(self):
        while not self.stop.wait(0.2):
            with open('/proc/self/status') as f:
                self.rss += [int(line.split()[1]) * 1024 for line in f if line.startswith('VmRSS')]
            if self.device.type == 'cuda':
                busy = gpu_utilisation(self.device)
                if busy is not None:
                    self.gpu_busy.append(busy)

    def report(self):
        return {'peak_rss_gib': max(self.rss, default=0) / 2**30,
                'cuda_max_allocated_gib': torch.cuda.max_memory_allocated(self.device) / 2**30
                if self.device.type == 'cuda' else None,
                'gpu_busy': statistics.mean(self.gpu_busy) / 100 if self.gpu_busy else None}


def gpu_utilisation(device):
    """Percent of the last sample period in which a kernel ran (NVML through nvidia-smi); None if unavailable."""
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=utilization.gpu', '--format=csv,noheader,nounits',
                              '-i', str(device.index or 0)], capture_output=True, text=True, timeout=5)
        return float(out.stdout.strip())
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def export_builtin_photos(folder, image_size, seed):
    """The built-in crops as JPEG files at twice the side, so both paths have real files to decode and resize."""
    os.makedirs(folder)
    splits = builtin_splits(max(2 * image_size, 178), 32, None, seed)
    for image, name in zip(splits.images, splits.names):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, f'{name}.jpg'), quality=95)
    return folder


def normalise(images):
    """ImageNet normalisation, done as the original did: a fresh pair of tensors every call."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def reference_epoch(victim, decoder, optimizer, loader, device):
    """One epoch of the straightforward loop; returns the number of images trained on."""
    decoder.train()
    seen = 0
    for images in progress(loader, desc='reference epoch'):
        images = images.to(device)
        with torch.no_grad():
            features = victim.encoder(normalise(images))
        loss = F.mse_loss(decoder(features), images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(images)
    loss.item()  # wait for the device
    return seen


def timed_epochs(run_epoch, epochs, device):
    """{'images': [...], 'seconds': [...]} of each epoch after the first (warm-up: worker start, caches,
    autotuning)."""
    timed = {'images': [], 'seconds': []}
    for epoch in range(epochs):
        started = time.perf_counter()
        seen = run_epoch(epoch)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        if epoch > 0:
            timed['images'].append(seen)
            timed['seconds'].append(time.perf_counter() - started)
    return timed


def median_rate(timed):
    """Images per second of the median epoch."""
    return statistics.median(n / s for n, s in zip(timed['images'], timed['seconds']))


def first_batch_losses(batch_size, attack, splits, reference_decoder, victim, reference_images, device):
    """The loss of the same first batch through both paths, from the same decoder weights (train mode)."""
    batch = splits.train_idx[:batch_size]
    attack.decoder.train()
    with torch.no_grad():
        images = attack.to_images(splits.images[batch])
        tool = F.mse_loss(attack.decode(attack.send(images), training=True), images).item()
        ref_images = torch.stack([reference_images[i] for i in range(len(batch))]).to(device)
        reference_decoder.train()
        reference = F.mse_loss(reference_decoder(victim.encoder(normalise(ref_images))), ref_images).item()
    return tool, reference, float((ref_images.cpu() - images.float().cpu()).abs().max())


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    flags = cli.Group(p)  # each default printed once, as in main.py --help
    flags.add_argument('--data_dir', help='a folder of images (default: the built-in photos, written out as JPEGs)')
    flags.add_argument('--arch', default='resnet18', help="the victim (the tool's --arch)")
    flags.add_argument('--split', help="where it is cut (default: the arch's default split)")
    flags.add_argument('--image_size', type=int, default=64, help='square side in pixels')
    flags.add_argument('--batch_size', type=int, default=32, help='images per step')
    flags.add_argument('--num_batches', type=int, help='use num_batches x batch_size images (default: all)')
    flags.add_argument('--decoder', default=DecoderSpec().kind, choices=DECODERS, help="the tool's --decoder")
    flags.add_argument('--interpolation', help="the tool's --interpolation (default: the decoder's own)")
    flags.add_argument('--decoder_depth', default=DecoderSpec().depth, choices=tuple(DECODER_DEPTHS),
                       help="the tool's --decoder_depth")
    flags.add_argument('--epochs', type=int, default=4, help='timed epochs per path, the first being warm-up')
    flags.add_argument('--num_workers', type=int, default=2, help="the reference loop's DataLoader workers")
    flags.add_argument('--device', default='auto', choices=('auto', 'cuda', 'cpu'), help='auto: CUDA when available')
    flags.add_argument('--precision', default='bf16', choices=('bf16', 'fp32'),
                       help="the tool path's: bf16 autocast where the hardware has bf16 arithmetic (CUDA, CPUs with "
                            "AVX512-BF16 or AMX), else fp32; the reference loop is fp32")
    flags.add_argument('--compile', action='store_true', help='the tool path with torch.compile')
    flags.add_argument('--save_dir', default='bench', help='where bench.json goes')
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error('--epochs: at least 2 (the first is warm-up)')
    return args


def tool_config(args, data_dir, cache_dir):
    """The tool's own configuration for these settings, through its own flag parser."""
    argv = ['--train', '--data_dir', data_dir, '--arch', args.arch, '--image_size', str(args.image_size),
            '--batch_size', str(args.batch_size), '--decoder', args.decoder, '--decoder_depth', args.decoder_depth,
            '--device', args.device, '--precision', args.precision, '--cache_dir', cache_dir,
            '--num_epochs', str(args.epochs)] + (['--split', args.split] if args.split else []) \
        + (['--interpolation', args.interpolation] if args.interpolation else []) \
        + (['--num_batches', str(args.num_batches)] if args.num_batches else []) + (['--compile'] if args.compile else [])
    parser = cli.build_parser()
    return cli.resolve_config(parser, parser.parse_args(argv), argv).config


def bench(args, workdir):
    device = pick_device(args.device)
    data_dir = args.data_dir or export_builtin_photos(os.path.join(workdir, 'photos'), args.image_size, seed=0)
    root, _ = list_images(data_dir)
    if not os.path.isdir(root):
        raise UsageError(f'--data_dir {data_dir}: the reference loop reads files from a folder, not a zip')
    config = tool_config(args, data_dir, os.path.join(workdir, 'cache'))
    victim_config, batch_size, image_size = config.victim, config.data.batch_size, config.data.image_size
    started = time.perf_counter()
    splits = load_splits(config.data)  # decodes every image once into the cache
    decode_seconds = time.perf_counter() - started
    attack, _ = build_attack(config, device)
    victim = build_victim(victim_config, image_size).to(device)
    reference_decoder = copy.deepcopy(attack.decoder).to(memory_format=torch.contiguous_format)
    reference_images = ReferenceImages([os.path.join(root, splits.names[i]) for i in splits.train_idx], image_size)
    tool_loss, reference_loss, pixel_diff = first_batch_losses(batch_size, attack, splits, reference_decoder, victim,
                                                               reference_images, device)

    loader = DataLoader(reference_images, batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=args.num_workers, generator=torch.Generator().manual_seed(0))
    reference_optimizer = torch.optim.Adam(reference_decoder.parameters(), lr=config.training.lr)
    with Sampler(device) as reference_usage:
        reference_timed = timed_epochs(lambda e: reference_epoch(victim, reference_decoder, reference_optimizer,
                                                                 loader, device), args.epochs, device)

    optimizer = make_optimizer(config.training, attack.decoder.parameters(), device)
    full_batches = len(splits.train_idx) // batch_size * batch_size
    plan = EpochPlan(config.training, batch_size, None, Budget(args.epochs))
    with Sampler(device) as tool_usage:
        started = time.perf_counter()
        cache = cache_features(attack, splits.images, splits.train_idx, batch_size,
                               config.training.feature_cache_gb * 2**30)
        feature_seconds = time.perf_counter() - started

        def tool_epoch(epoch):
            train_one_epoch(attack, splits, cache, plan, optimizer, epoch)
            return full_batches
        tool_timed = timed_epochs(tool_epoch, args.epochs, device)
        eval_rates = []
        for _ in range(3):
            started = time.perf_counter()
            evaluate(attack, splits.images, splits.val_idx, batch_size, desc='eval')
            eval_rates.append(len(splits.val_idx) / (time.perf_counter() - started))

    tolerance = BF16_TOLERANCE if attack.bf16 else FP32_TOLERANCE
    relative = abs(tool_loss - reference_loss) / reference_loss
    return {
        'settings': {'data': args.data_dir or 'built-in photos as JPEG', 'arch': victim_config.arch,
                     'split': victim_config.split, 'decoder': config.decoder.label(),
                     'image_size': image_size, 'batch_size': batch_size, 'device': str(device),
                     'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
                     'threads': torch.get_num_threads(), 'train_images': len(splits.train_idx),
                     'tool_precision': attack.precision, 'compile': config.runtime.compile,
                     'reference_workers': args.num_workers, 'timed_epochs': args.epochs - 1},
        'reference': {'train_images_per_s': median_rate(reference_timed), 'epochs': reference_timed,
                      **reference_usage.report()},
        'tool': {'train_images_per_s': median_rate(tool_timed), 'epochs': tool_timed,
                 'eval_images_per_s': statistics.median(eval_rates), 'one_time_decode_s': decode_seconds,
                 'one_time_feature_cache_s': feature_seconds, 'feature_cache': cache is not None, **tool_usage.report()},
        'speedup': median_rate(tool_timed) / median_rate(reference_timed),
        'first_batch_loss': {'tool': tool_loss, 'reference': reference_loss, 'relative_difference': relative,
                             'tolerance': tolerance, 'max_pixel_difference': pixel_diff, 'same': relative <= tolerance},
    }


def print_table(result):
    s, ref, tool = result['settings'], result['reference'], result['tool']
    print(f"\n{s['arch']}/{s['split']} {s['image_size']}px batch {s['batch_size']}, {s['decoder']}, on "
          f"{s['device_name']} ({s['threads']} threads), {s['train_images']} training images, median of "
          f"{s['timed_epochs']} epochs")
    gib = lambda v: '-' if v is None else f'{v:.2f}'  # noqa: E731
    busy = lambda v: '-' if v is None else f'{100 * v:.0f}%'  # noqa: E731
    rows = [('path', 'train img/s', 'eval img/s', 'peak RSS GiB', 'CUDA max GiB', 'GPU busy'),
            ('reference', f"{ref['train_images_per_s']:.1f}", '-', gib(ref['peak_rss_gib']),
             gib(ref['cuda_max_allocated_gib']), busy(ref['gpu_busy'])),
            ('tool', f"{tool['train_images_per_s']:.1f}", f"{tool['eval_images_per_s']:.1f}", gib(tool['peak_rss_gib']),
             gib(tool['cuda_max_allocated_gib']), busy(tool['gpu_busy']))]
    for row in rows:
        print('  '.join(f'{cell:>13}' for cell in row))
    loss = result['first_batch_loss']
    print(f"speed-up (tool / reference): {result['speedup']:.2f}x;  one-time: decode {tool['one_time_decode_s']:.1f}s, "
          f"feature cache {tool['one_time_feature_cache_s']:.1f}s")
    print(f"first-batch loss: tool {loss['tool']:.6f}, reference {loss['reference']:.6f} "
          f"(relative difference {loss['relative_difference']:.1e}, tolerance {loss['tolerance']:.0e})")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with tempfile.TemporaryDirectory() as workdir:
            result = bench(args, workdir)
    except UsageError as e:
        sys.exit(f'error: {e}')
    save_dir = fresh_run_dir(args.save_dir)
    save_json(result, os.path.join(save_dir, 'bench.json'))
    print_table(result)
    print(f'outputs written to {os.path.abspath(save_dir)}')
    if not result['first_batch_loss']['same']:
        sys.exit('error: the two paths disagree on the first batch beyond tolerance: the speed is not comparable')


if __name__ == '__main__':
    main()
