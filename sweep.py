"""Sweeps: one decoder per value of a setting, trained with the same budget and seed, then one comparison table
(sweep.csv, sweep.md) and figures (sweep.png, sweep_samples.png). Finished values are read back from disk."""
import json
import os

import torch

from data import load_splits
from evaluate import evaluate_and_report, load_trained_attack, msssim_note, utility_note
from models import SPLITS, check_cut, probe_feature_shape, test_noise
from train import train
from utils import UsageError, atomic_write_bytes, fresh_run_dir, load_checkpoint, save_csv, save_json

SWEEPS = ('split', 'keep_channels', 'noise_var')
DEFAULT_VALUES = {'keep_channels': ('1', '0.5', '0.25', '0.125', '0.0625'),
                  'noise_var': ('0', '0.01', '0.05', '0.1', '0.5')}
# Settings of how a run is carried out, not of what it computes: they may differ between a sweep and its resume.
RUN_KEYS = {'mode', 'save_dir', 'overwrite', 'device', 'num_workers', 'cache_dir', 'model_path', 'num_samples',
            'channel_indices', 'victim_fingerprint', 'sweep_values', 'compile'}


def parse_values(cfg):
    """The swept values, typed and checked; the defaults when --sweep_values is not given."""
    name = cfg['sweep']
    raw = cfg['sweep_values'] or (tuple(SPLITS[cfg['arch']]) if name == 'split' else DEFAULT_VALUES[name])
    if name == 'split':
        unknown = [v for v in raw if v not in SPLITS[cfg['arch']]]
        if unknown:
            raise UsageError(f'--sweep_values: {", ".join(unknown)} not a split of {cfg["arch"]} '
                             f'(choose from {", ".join(SPLITS[cfg["arch"]])})')
        for split in raw:
            check_cut(cfg['arch'], split, cfg['image_size'], cfg['keep_channels'])
        return list(raw)
    try:
        values = [float(v) for v in raw]
    except ValueError:
        raise UsageError(f'--sweep_values for --sweep {name} must be numbers, got {" ".join(raw)}') from None
    if name == 'noise_var' and any(v < 0 for v in values):
        raise UsageError('--sweep_values for --sweep noise_var: a variance cannot be negative')
    if name == 'keep_channels':
        if any(v <= 0 for v in values):
            raise UsageError('--sweep_values for --sweep keep_channels must be positive')
        for v in values:
            check_cut(cfg['arch'], cfg['split'], cfg['image_size'], v)
    return values


def value_label(value):
    return value if isinstance(value, str) else f'{value:g}'


def value_config(cfg, value):
    """The configuration of one run of the sweep, in its own folder under the sweep's --save_dir."""
    run = {**cfg, 'mode': 'train', 'sweep': None, 'sweep_values': None, 'channel_indices': None,
           'save_dir': os.path.join(cfg['save_dir'], f'{cfg["sweep"]}={value_label(value)}')}
    if cfg['sweep'] == 'split':
        run['split'] = value
    elif cfg['sweep'] == 'keep_channels':
        run['keep_channels'] = value
    else:  # the same noise while the attacker trains and when it is measured
        run.update(aug=value > 0, test_noise=value > 0, noise_var=value, test_noise_var=value)
    return run


def comparable(cfg):
    return {k: v for k, v in cfg.items() if k not in RUN_KEYS}


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def finished_result(run):
    """The eval.json of a value already done with exactly this configuration, else None."""
    result = read_json(os.path.join(run['save_dir'], 'eval.json'))
    if result and comparable(result['config']) == comparable(run):
        return result
    return None


def sweep_dir(cfg):
    """Resume in --save_dir when it holds this same sweep; else a fresh folder beside a used one."""
    previous = read_json(os.path.join(cfg['save_dir'], 'sweep.json'))
    if cfg['overwrite'] or (previous and comparable(previous['config']) == comparable(cfg)):
        return cfg['save_dir']
    chosen = fresh_run_dir(cfg['save_dir'])
    if chosen != cfg['save_dir']:
        print(f'{cfg["save_dir"]} holds another run or sweep: writing to {chosen}')
    return chosen


def table_row(cfg, value, result):
    run = result['config']
    channels, height, width = probe_feature_shape(run['arch'], run['split'], run['image_size'])
    sent = len(run['channel_indices']) if run.get('channel_indices') else channels
    metrics = {name: stats['mean'] for name, stats in result['metrics'].items()}
    return {cfg['sweep']: value_label(value), 'tensor': f'{channels}x{height}x{width}', 'channels_sent': sent,
            'psnr': metrics['psnr'], 'psnr_std': result['metrics']['psnr']['std'], 'ssim': metrics['ssim'],
            'ms_ssim': metrics['ms_ssim'], 'mse': metrics['mse'], 'top1_agreement': metrics['top1_agreement'],
            'top5_agreement': metrics['top5_agreement'], 'kl': metrics['kl'], 'n_images': result['n_images']}


def markdown_table(rows, cfg, description):
    victim = 'ImageNet weights' if cfg['pretrained'] else ('--weights' if cfg['weights'] else 'random-initialised')
    lines = [f'Sweep of `{cfg["sweep"]}`: {cfg["arch"]} ({victim})'
             + (f' cut at {cfg["split"]}' if cfg['sweep'] != 'split' else '')
             + f', {cfg["interpolation"]} decoder ({cfg["decoder_depth"]}), {cfg["image_size"]} px, '
             f'{cfg["num_epochs"]} epochs, seed {cfg["seed"]}; {description}.', '',
             f'| {cfg["sweep"]} | tensor | channels sent | PSNR (dB) | SSIM | MS-SSIM | top-1 agreement '
             '| top-5 agreement | KL (nats) |', '|' + '---|' * 9]
    for r in rows:
        lines.append(f'| {r[cfg["sweep"]]} | {r["tensor"]} | {r["channels_sent"]} | {r["psnr"]:.2f} ± '
                     f'{r["psnr_std"]:.2f} | {r["ssim"]:.3f} | {r["ms_ssim"]:.3f} | {r["top1_agreement"]:.3f} | '
                     f'{r["top5_agreement"]:.3f} | {r["kl"]:.4f} |')
    lines += ['', f'{msssim_note(cfg["image_size"])}. {utility_note(cfg)}.', '']
    return '\n'.join(lines)


@torch.no_grad()
def sample_reconstructions(runs, images, device):
    """Each value's reconstruction of the same images, from the model.pth it wrote."""
    rows = []
    for run in runs:
        path = os.path.join(run['save_dir'], 'model.pth')
        state = load_checkpoint(path)
        attack = load_trained_attack({**state['config'], 'model_path': path}, state, device)
        attack.decoder.eval()
        target = attack.to_images(images)
        rows.append(attack.reconstruct(target, test_noise(state['config']), attack.noise_generator(0)).cpu())
    return rows


def run_sweep(cfg, device):
    from visualize import plot_sweep, plot_sweep_samples, sample_indices
    values = parse_values(cfg)
    cfg['save_dir'] = sweep_dir(cfg)
    save_json({'sweep': cfg['sweep'], 'values': [value_label(v) for v in values], 'config': cfg},
              os.path.join(cfg['save_dir'], 'sweep.json'))
    runs, rows = [value_config(cfg, v) for v in values], []
    for i, (value, run) in enumerate(zip(values, runs)):
        result = finished_result(run)
        if result is not None:
            print(f'sweep {cfg["sweep"]} {i + 1}/{len(values)}: {value_label(value)} already done, read from '
                  f'{run["save_dir"]}')
        else:
            print(f'sweep {cfg["sweep"]} {i + 1}/{len(values)}: {cfg["sweep"]}={value_label(value)}')
            attack, splits, _, _ = train(run, device)
            evaluate_and_report(attack, splits.images, splits.val_idx, splits.val_names, run,
                                f'validation split of {splits.description}', {'sweep': cfg['sweep'], 'value': value})
            result = read_json(os.path.join(run['save_dir'], 'eval.json'))
        rows.append(table_row(cfg, value, result))
    splits = load_splits(runs[0])
    save_csv(rows, os.path.join(cfg['save_dir'], 'sweep.csv'))
    atomic_write_bytes(os.path.join(cfg['save_dir'], 'sweep.md'),
                       markdown_table(rows, cfg, f'validation split of {splits.description}').encode())
    plot_sweep(rows, cfg, os.path.join(cfg['save_dir'], 'sweep.png'))
    chosen = splits.val_idx[sample_indices(len(splits.val_idx), cfg['num_samples'])]
    images = splits.images[chosen]
    plot_sweep_samples(images, sample_reconstructions(runs, images, device), [value_label(v) for v in values],
                       [splits.names[i] for i in chosen], cfg, os.path.join(cfg['save_dir'], 'sweep_samples.png'))
    print(markdown_table(rows, cfg, f'validation split of {splits.description}'))
    return rows
