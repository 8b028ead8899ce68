"""Figures a researcher looks at before trusting a number; headless (Agg), every figure closed after saving; and
the live curves of --tensorboard."""
import contextlib
import os
from typing import NamedTuple

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

from .attacks import attacker_name, received, recover  # noqa: E402
from .config import AttackPlan  # noqa: E402
from .defences import describe as describe_defences  # noqa: E402
from .distributed import is_main_process  # noqa: E402
from .evaluate import (BASELINES, Baselines, attack_slug, baseline_line, evaluate, evaluate_and_report,  # noqa: E402
                       result_flags, split_baselines)
from .metrics import score, summarise  # noqa: E402
from .models.cuts import victim_name  # noqa: E402
from .models.layouts import layout_of  # noqa: E402
from .models.victims import victim_label  # noqa: E402
from .utils import to_unit  # noqa: E402
from .worst_case import ALL, WORST_ROW, run_all  # noqa: E402

FEATURE_CHANNELS = 16  # highest-variance channels shown in feature_maps.png
CHANNELS_PER_STAGE = 4  # decoder activations shown per stage


def describe(config, derived, kind='decoder'):
    """One line that makes a figure of a run (config.Config, config.Derived) explain itself: victim, cut, attacker
    (of attack `kind`), defences, noise."""
    noise_config = derived.noise(config.noise)
    noise = noise_config.testing()
    on_input = noise is not None and noise.at == 'input'
    input_noise = [f'noise on the input (mean {noise.mean:g}, var {noise.var:g})'] if on_input else []
    defences = input_noise + describe_defences(config.defence, noise_config, derived.victim_defence)
    attacker = attacker_name(kind, config.decoder, config.training.feature_weight)
    return (f'{victim_name(config.victim)} ({victim_label(config.victim)}) cut at {config.victim.split} | {attacker} | '
            f'{config.data.image_size}px | ' + (f'defence: {", ".join(defences)}' if defences else 'no defence'))


def save_figure(fig, path):
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)
    return path


def to_numpy_image(image):
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


LOSS_NAMES = {'mse': 'pixel MSE', 'l1': 'pixel L1', 'ssim': '1 - SSIM', 'mix': '0.84 (1 - SSIM) + 0.16 L1'}


def plot_history(history, title, path, loss='mse'):
    """Per epoch: the training objective (--loss, with any extra terms), the validation MSE, and the validation PSNR
    and SSIM, each on an axis of its own."""
    epochs = [h['epoch'] for h in history]
    fig, (objective, mse, right) = plt.subplots(1, 3, figsize=(15, 4), layout='constrained')
    objective.plot(epochs, [h['train_loss'] for h in history], 'o-')
    objective.set(xlabel='epoch', ylabel=f'training loss ({LOSS_NAMES[loss]})', yscale='log',
                  title='what training minimises')
    mse.plot(epochs, [h['val_loss'] for h in history], 's-', color='tab:orange')
    mse.set(xlabel='epoch', ylabel='validation MSE', yscale='log', title='validation error')
    right.plot(epochs, [h['psnr'] for h in history], 'o-', color='tab:green', label='PSNR')
    right.set(xlabel='epoch', ylabel='validation PSNR (dB)', title='validation quality')
    ssim_axis = right.twinx()
    ssim_axis.plot(epochs, [h['ssim'] for h in history], 's-', color='tab:purple', label='SSIM')
    ssim_axis.set_ylabel('validation SSIM')
    right.legend(handles=right.lines + ssim_axis.lines, loc='lower right')
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def sample_indices(n_available, n_samples):
    """The same validation images every run."""
    order = torch.randperm(n_available, generator=torch.Generator().manual_seed(0))
    return order[:min(n_samples, n_available)].sort().values


def plot_image_grid(rows, names, title, path):
    """rows: (label, [0, 1] batch) pairs, the originals first; every other image is scored against its original."""
    target, n = rows[0][1], len(names)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.9 * n, 2.2 * len(rows)), squeeze=False, layout='constrained')
    for r, (label, batch) in enumerate(rows):
        metrics = score(batch, target) if r else None
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(to_numpy_image(batch[c]))
            ax.set_xticks([]), ax.set_yticks([])
            if metrics is not None:
                ax.set_xlabel(f'{metrics["psnr"][c]:.2f} dB / SSIM {metrics["ssim"][c]:.3f}', fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0:
                ax.set_title(os.path.splitext(names[c])[0], fontsize=6)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


class Sample(NamedTuple):
    """Some of the Scored images, for figures: uint8 images, their names, and their positions among the scored
    images (which seed their test noise and dropout masks, as in the evaluation)."""
    images: torch.Tensor
    names: list
    positions: list


def samples(scored, count):
    """The same `count` of the Scored images every run."""
    chosen = sample_indices(len(scored.indices), count)
    return Sample(scored.images[scored.indices[chosen]], [scored.names[i] for i in chosen], chosen.tolist())


@torch.no_grad()
def sample_sent(attack, sample, noise):
    """([0, 1] images, the tensor the evaluation scored them from) of a Sample: the test noise (a config.Noise) and
    defences as evaluated, image by image."""
    target = attack.to_images(sample.images)
    return target, received(attack, target, sample.positions, noise)[1]


class Kept:
    """One of `evaluate`'s measures: keeps the reconstructions of the images at `positions` among those scored, so
    that a sample grid shows the very images the evaluation scored instead of running the attack again (for
    --attack all, every row of worst_case.run_all)."""

    def __init__(self, positions):
        self.positions, self.found = list(positions), {}

    def __call__(self, images, sent, positions, recon):
        rows = recon if isinstance(recon, dict) else {None: recon}
        for i, p in enumerate(positions):
            if p in self.positions:
                self.found[p] = {label: batch[i].clone() for label, batch in rows.items()}
        return {}

    def reconstructions(self):
        """The kept images: one batch, or for --attack all {row label: batch}."""
        rows = {label: torch.stack([self.found[p][label] for p in self.positions]) for label in self.found[
            self.positions[0]]}
        return rows.get(None, rows)


@torch.no_grad()
def plot_samples(attack, sample, noise, title, save_dir, plan=AttackPlan(), reconstructions=None, mean_image=None):
    """Columns of original | reconstruction by the attack `plan` from the very tensor the evaluation scored (test
    `noise` and defences included), so each image's PSNR is the one in eval_per_image.csv, over the mean training
    image (the baseline beside which a reconstruction is read) where it is known; each image also as its own PNG
    under save_dir/samples/. `reconstructions`: the evaluation's own (Kept), else the attack runs here."""
    if attack.decoder is not None:
        attack.decoder.eval()
    target, sent = sample_sent(attack, sample, noise)
    if reconstructions is None:
        reconstructions = (run_all(attack, sent, plan, target)[1] if plan.kind == ALL
                           else recover(attack, sent, plan, target.shape))
    received_as = f' (noisy {noise.at}, var {noise.var:g})' if noise is not None else ''
    each = reconstructions if isinstance(reconstructions, dict) else {plan.kind: reconstructions}
    rows = [('original', target)] + [(f'{label} reconstruction{received_as}', batch) for label, batch in each.items()]
    baseline = [] if mean_image is None else [('mean training image\n(baseline)', mean_image.expand_as(target))]
    samples_dir = os.path.join(save_dir, 'samples')
    os.makedirs(samples_dir, exist_ok=True)
    slug, shown = attack_slug(plan.kind), each.get(WORST_ROW, reconstructions)
    for c, name in enumerate(sample.names):
        stem = os.path.splitext(name.replace(os.sep, '_'))[0]
        save_image(target[c], os.path.join(samples_dir, f'{stem}_original.png'))
        save_image(shown[c].clamp(0, 1), os.path.join(samples_dir, f'{stem}_reconstruction{slug}.png'))
    title += '' if plan.kind == 'decoder' else (f'\n{plan.kind} attack: {plan.steps} Adam steps, lr {plan.lr:g}, TV '
                                                 f'weight {plan.tv_weight:g}')
    return plot_image_grid(rows + baseline, sample.names, title, os.path.join(save_dir, f'samples{slug}.png'))


def plot_feature_maps(image, sent, title, path):
    """The tensor one [0, 1] image was sent as (as evaluated): its highest-variance channels on a shared scale, and
    the channel mean."""
    features = sent.float().cpu()
    top = features.flatten(1).var(1).argsort(descending=True)[:FEATURE_CHANNELS]
    vmin, vmax = features[top].min().item(), features[top].max().item()
    fig = plt.figure(figsize=(11, 6.5))
    grid = fig.add_gridspec(4, 6, wspace=0.4)  # input and channel mean on the left, a 4x4 grid of channels on the right
    ax = fig.add_subplot(grid[0:2, 0:2])
    ax.imshow(to_numpy_image(image))
    ax.set_title('input image', fontsize=9), ax.axis('off')
    ax = fig.add_subplot(grid[2:4, 0:2])
    mean_map = ax.imshow(features.mean(0), cmap='viridis')
    ax.set_title(f'mean over all {features.shape[0]} channels', fontsize=9), ax.axis('off')
    fig.colorbar(mean_map, ax=ax, fraction=0.046)
    for k, channel in enumerate(top.tolist()):
        ax = fig.add_subplot(grid[k // 4, 2 + k % 4])
        shown = ax.imshow(features[channel], cmap='viridis', vmin=vmin, vmax=vmax)
        ax.set_title(f'ch {channel}', fontsize=8), ax.axis('off')
    fig.colorbar(shown, ax=fig.axes[2:], fraction=0.02, label='activation (shared scale)')
    c, h, w = features.shape
    fig.suptitle(f'sent tensor {c}x{h}x{w}: {len(top)} highest-variance channels\n{title}', fontsize=9)
    return save_figure(fig, path)


@torch.no_grad()
def capture_decoder_activations(attack, sent):
    """Each decoder stage's output for one sent tensor, captured with forward hooks that are removed afterwards."""
    captured = []
    modules = list(attack.decoder.stages) + [attack.decoder.to_image]
    handles = [m.register_forward_hook(lambda _m, _in, out: captured.append(out[0].float().cpu())) for m in modules]
    try:
        attack.decoder.eval()
        attack.decode(sent[None])
    finally:
        for handle in handles:
            handle.remove()
    return captured


def plot_decoder_layers(attack, sent, title, path):
    activations = capture_decoder_activations(attack, sent)
    fig, axes = plt.subplots(len(activations), CHANNELS_PER_STAGE, figsize=(2.2 * CHANNELS_PER_STAGE,
                                                                          2.2 * len(activations)), squeeze=False)
    for row, activation in enumerate(activations):
        last = row == len(activations) - 1
        channels = list(range(3)) if last else activation.flatten(1).var(1).argsort(descending=True).tolist()
        for col in range(CHANNELS_PER_STAGE):
            ax = axes[row, col]
            ax.axis('off')
            if last and col == CHANNELS_PER_STAGE - 1:
                ax.imshow(to_numpy_image(activation)), ax.set_title('output image', fontsize=8)
            elif col < len(channels):
                channel = channels[col]
                ax.imshow(activation[channel], cmap='magma')
                ax.set_title(f'ch {channel}' if not last else 'RGB'[channel], fontsize=8)
        name = 'output' if last else f'stage {row + 1}'
        axes[row, 0].text(-0.15, 0.5, f'{name}\n{"x".join(map(str, activation.shape))}', transform=axes[row, 0].transAxes,
                          ha='right', va='center', fontsize=9)
    fig.suptitle(f'decoder activations (highest-variance channels)\n{title}', fontsize=9)
    return save_figure(fig, path)


def plot_defence_history(history, title, path):
    """Defence training's two objectives per epoch: the distillation KL to the original victim (utility) and the
    privacy term (what the defence pushes down)."""
    epochs = [h['epoch'] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(epochs, [h['kl'] for h in history], 'o-', label='KL to the original victim')
    left.set(xlabel='epoch', ylabel='KL (nats)', title='utility: distillation')
    right.plot(epochs, [h['privacy'] for h in history], 's-', color='tab:red', label='privacy term (weighted)')
    right.set(xlabel='epoch', ylabel='privacy term', title='privacy: what the defence minimises')
    fig.suptitle(f'defence training: {title}', fontsize=9)
    return save_figure(fig, path)


def plot_psnr_histogram(psnr_values, title, scored, path, baselines=None):
    """The per-image PSNR of the Scored images, titled with what they are, beside the baselines' mean PSNR on them
    (`baselines`: {name: {'psnr': summary}})."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(psnr_values.numpy(), bins=min(40, max(5, len(psnr_values) // 4)), color='tab:blue', alpha=0.8)
    mean, median = psnr_values.mean().item(), psnr_values.median().item()
    ax.axvline(mean, color='tab:red', label=f'mean {mean:.2f} dB')
    ax.axvline(median, color='black', linestyle='--', label=f'median {median:.2f} dB')
    for (name, figures), style in zip((baselines or {}).items(), (':', '-.')):
        ax.axvline(figures['psnr']['mean'], color='tab:gray', linestyle=style,
                   label=f'{BASELINES[name]} (baseline) {figures["psnr"]["mean"]:.2f} dB')
    ax.set(xlabel='per-image PSNR (dB)', ylabel='images',
           title=f'{len(psnr_values)} images scored: {scored.description}')
    ax.legend()
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def scored_title(title, per_image):
    """A figure's title with the baselines on its images and what they flag beneath it."""
    own, baselines = split_baselines(summarise(per_image))
    found = result_flags(own['psnr']['mean'], baselines, len(per_image['psnr'])) if 'psnr' in own else {}
    return f'{title}\n{baseline_line(baselines)}' + ''.join(f'\nWARNING: {flag}' for flag in found.values()), baselines


def draw_all(attack, scored, config, derived, history, save_dir, per_image=None, mean_image=None):
    """Every figure of the Scored images by the attack of a run (config.Config, config.Derived) into save_dir, beside
    the baselines (`mean_image`: the mean training image, where known); returns their paths. `per_image`: the
    evaluation's per-image figures (its baselines' among them) if known."""
    os.makedirs(save_dir, exist_ok=True)
    noise, paths = derived.noise(config.noise).testing(), []
    if per_image is None:
        per_image = evaluate(attack, scored.images, scored.indices, config.data.batch_size, noise,
                             measures=[Baselines(attack, config, derived, mean_image)])
    title = describe(config, derived)
    scored_as, baselines = scored_title(title, per_image)
    if history:
        paths.append(plot_history(history, title, os.path.join(save_dir, 'loss.png'), config.training.loss))
    else:
        print('loss.png skipped: this file holds no training history')
    sample = samples(scored, config.outputs.num_samples)
    paths.append(plot_samples(attack, sample, noise, scored_as, save_dir, mean_image=mean_image))
    images, sent = sample_sent(attack, sample, noise)
    layout = layout_of(tuple(sent.shape[1:]))
    if layout.kind == 'vector':
        print('feature_maps.png skipped: the cut sends a vector, no map to draw')
    else:
        read_as = '' if layout.kind == 'map' else f' | {layout.kind} {"x".join(map(str, sent.shape[1:]))} read as a map'
        paths.append(plot_feature_maps(images[0], layout.to_map(sent[:1])[0], title + read_as,
                                       os.path.join(save_dir, 'feature_maps.png')))
    paths.append(plot_decoder_layers(attack, sent[0], title, os.path.join(save_dir, 'decoder_layers.png')))
    paths.append(plot_psnr_histogram(per_image['psnr'], scored_as, scored, os.path.join(save_dir, 'psnr_hist.png'),
                                     baselines))
    print(f'figures: {", ".join(os.path.basename(p) for p in paths)} and samples/ in {save_dir}')
    return paths


def run_attack(attack, scored, config, derived, extra=None, history=(), bound=None, mean_image=None):
    """Evaluate the run's --attack (config.attack) on the Scored images (eval{_attack}.json, per-image CSV) beside
    the baselines (`mean_image`: the mean training image, where known) and draw its sample grid from the
    reconstructions it scored; `history`: the training history of the decoder it uses; `bound`: the images' Bound
    where another attack on them has one."""
    plan, sample = config.attack, samples(scored, config.outputs.num_samples)
    kept = Kept(sample.positions)
    per_image, _ = evaluate_and_report(attack, scored, config, derived, extra, plan, history, bound, [kept],
                                       mean_image)
    title, _ = scored_title(describe(config, derived, plan.kind), per_image)
    plot_samples(attack, sample, derived.noise(config.noise).testing(), title, config.outputs.save_dir, plan,
                 kept.reconstructions(), mean_image)


def measured(value):
    """A figure for plotting: NaN (no point) where it was not measured."""
    return float('nan') if value is None else value


def plot_sweep(rows, labels, swept, kind, title, path):
    """Reconstruction quality by the attack `kind` against the values of the setting `swept`; the victim's agreement
    on a second axis for defences."""
    x = range(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), layout='constrained')
    psnr_line = left.errorbar(x, [r['psnr'] for r in rows], yerr=[r['psnr_std'] for r in rows], fmt='o-', capsize=3,
                              label=f'{kind} attack PSNR (dB, ± std)')
    utility = swept not in ('split', 'decoder')  # a defence: what it costs the victim
    left.set(xlabel=swept, ylabel='validation PSNR (dB)',
             title='reconstruction vs victim utility' if utility else 'reconstruction quality')
    handles = [psnr_line]
    if any(r.get('baseline_psnr') is not None for r in rows):
        handles += left.plot(x, [measured(r.get('baseline_psnr')) for r in rows], 'x--', color='tab:gray',
                             label='strongest baseline (mean image or untrained decoder, dB)')
    if any(r.get('decoder_psnr') is not None for r in rows):  # the swept attack refines the decoder's output
        handles += left.plot(x, [measured(r.get('decoder_psnr')) for r in rows], 'o-', color='tab:green',
                             label='decoder alone (PSNR, dB)')
    if any(r['psnr_ceiling'] is not None for r in rows):
        handles += left.plot(x, [measured(r['psnr_ceiling']) for r in rows], 'v:', color='k',
                             label='unbiased-attacker ceiling (dFIL; an attacker with a prior can beat it)')
    if utility:
        agreement = left.twinx()
        agreement.plot(x, [measured(r['top1_agreement']) for r in rows], 's--', color='tab:red',
                       label='victim top-1 agreement')
        agreement.plot(x, [measured(r['top5_agreement']) for r in rows], '^:', color='tab:orange',
                       label='victim top-5 agreement')
        agreement.set(ylabel='agreement with the undefended victim', ylim=(-0.05, 1.05))
        handles += agreement.lines
    left.legend(handles=handles, loc='best', fontsize=8)
    right.plot(x, [r['ssim'] for r in rows], 'o-', label='SSIM')
    right.plot(x, [r['ms_ssim'] for r in rows], 's-', label='MS-SSIM')
    right.set(xlabel=swept, ylabel='validation similarity', ylim=(0, 1), title='structural similarity')
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xticks(list(x), labels)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_training_time(histories, labels, title, path):
    """Validation PSNR against training minutes (epochs and their validation), one line per swept value: which
    attacker is ahead at every budget, not only at the end."""
    fig, ax = plt.subplots(figsize=(7, 4.2), layout='constrained')
    for history, label in zip(histories, labels):
        minutes = torch.tensor([h['seconds'] for h in history]).cumsum(0) / 60
        ax.plot(minutes.tolist(), [h['psnr'] for h in history], 'o-', markersize=3, label=label)
    ax.set(xlabel='training time (minutes)', ylabel='validation PSNR (dB)', title='PSNR against training time')
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


LABEL_OFFSETS = ((5, 4), (5, -10), (-14, 4), (-14, -10))  # points of a text label beside its marker
FAMILIES = {'': ('k', '*', 'no defence'), 'fixed': ('tab:blue', 'o', 'fixed defences'),
            'trained': ('tab:red', 's', 'trained defences')}


def frontier(points):
    """The privacy-utility frontier of (agreement, PSNR) points: those no other point beats at once on utility
    (higher agreement) and privacy (lower PSNR), by agreement."""
    return sorted(p for p in points if not any(q != p and q[0] >= p[0] and q[1] <= p[1] for q in points))


def plot_privacy_utility(rows, labels, title, path):
    """Attacks and defences side by side: attack PSNR against the victim's top-1 agreement (a defence wants
    the bottom right: low PSNR at full agreement), fixed and trained defences as separate series with their
    frontiers; and each row's PSNR and SSIM."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), layout='constrained')
    by_family = 'family' in rows[0]  # a defence sweep; an attack sweep has one point per attack
    charged = [(r, label) for r, label in zip(rows, labels) if r['top1_agreement'] is not None]  # utility measured
    series = ([(FAMILIES[f], [(r, label) for r, label in charged if r['family'] == f]) for f in FAMILIES]
              if by_family else [((None, 'o', label), [(r, label)]) for r, label in charged])
    frontiers = False
    for (colour, marker, name), members in series:
        if not members:
            continue
        points = [(row['top1_agreement'], row['psnr']) for row, _ in members]
        left.errorbar(*zip(*points), yerr=[row['psnr_std'] for row, _ in members], fmt=marker, color=colour,
                      capsize=3, label=name)
        if by_family and len(points) > 1:
            left.plot(*zip(*frontier(points)), '--', color=colour, linewidth=1)
            frontiers = True
        for i, ((agreement, psnr_value), (_, label)) in enumerate(zip(points, members)):
            left.annotate(label, (agreement, psnr_value), textcoords='offset points', xytext=LABEL_OFFSETS[i % 4],
                          fontsize=7)  # neighbours' labels on different sides, so close points stay readable
    baselines = [(r['top1_agreement'], r['baseline_psnr']) for r, _ in charged if r.get('baseline_psnr') is not None]
    if baselines:
        left.plot(*zip(*baselines), 'x', color='tab:gray', label='strongest baseline of each point')
    undefended = [row['psnr'] for row in rows if by_family and row['family'] == '']
    if len(undefended) == 1:  # what each defence costs the attacker is the drop below this line
        left.axhline(undefended[0], color='k', linestyle=':', linewidth=1)
    left.set(xlabel='victim top-1 agreement with the original, undefended victim', ylabel='attack PSNR (dB, ± std)',
             xlim=(-0.05, 1.1), title='privacy vs utility' + (" (dashed: each family's frontier)" if frontiers else ''))
    left.legend(fontsize=8)
    x = range(len(rows))
    psnr_bars = right.bar([i - 0.2 for i in x], [r['psnr'] for r in rows], width=0.4, label='PSNR (dB)',
                          color='tab:blue')
    handles = [psnr_bars]
    if any(r.get('baseline_psnr') is not None for r in rows):
        handles += right.plot([i - 0.2 for i in x], [measured(r.get('baseline_psnr')) for r in rows], '_',
                              color='k', markersize=14, label='strongest baseline (dB)')
    right.set(ylabel='attack PSNR (dB)', title='reconstruction quality')
    ssim_axis = right.twinx()
    ssim_bars = ssim_axis.bar([i + 0.2 for i in x], [r['ssim'] for r in rows], width=0.4, label='SSIM',
                              color='tab:orange')
    ssim_axis.set(ylabel='SSIM', ylim=(0, 1))
    right.set_xticks(list(x), labels, rotation=30, ha='right', fontsize=8)
    right.legend(handles=[*handles, ssim_bars], loc='upper right', fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_sweep_samples(sample, reconstructions, labels, swept, title, path):
    """One row of reconstructions of the same validation images per value of the setting `swept`, originals on
    top."""
    rows = [('original', to_unit(sample.images))] + [(f'{swept}=\n{label}', recon)  # two short lines
                                                     for label, recon in zip(labels, reconstructions)]
    return plot_image_grid(rows, sample.names, title, path)


class LiveCurves:
    """--tensorboard: scalars per epoch and a grid of fixed validation images over their reconstructions, as
    TensorBoard event files in the run's folder, so `tensorboard --logdir` over a sweep shows its values as
    comparable runs. A resumed run drops the events after the epoch it resumes from."""

    def __init__(self, save_dir, record, sample=None, noise=None, log_interval=1, budget=None, first_epoch=0):
        from torch.utils.tensorboard import SummaryWriter  # loads the tensorboard package (seconds): only when asked
        self.writer = SummaryWriter(save_dir, purge_step=first_epoch + 1 if first_epoch else None)
        self.sample, self.noise, self.log_interval, self.budget = sample, noise, log_interval, budget
        if not first_epoch:
            self.writer.add_text('config', '\n'.join(f'    {k}: {v}' for k, v in record.items()))  # a code block

    def log(self, epoch, scalars):
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    @torch.no_grad()
    def reconstructions(self, epoch, attack):
        """The first epoch's, every --log_interval epochs' and the last epoch's reconstructions by `attack`."""
        if epoch != 1 and epoch % self.log_interval and epoch != self.budget.epochs:
            return
        attack.decoder.eval()
        target, sent = sample_sent(attack, self.sample, self.noise)
        recon = attack.decode(sent).clamp(0, 1)
        grid = make_grid(torch.cat([target, recon]).float().cpu(), nrow=len(target))
        self.writer.add_image('validation/reconstructions', grid, epoch)
        self.writer.flush()

    def close(self):
        self.writer.close()


def live_curves(config, record, scored=None, noise=None, budget=None, first_epoch=0):
    """A LiveCurves of a run (config: a config.Config; record: its flags, for the text of its configuration; its
    grid: samples of the Scored images with the test `noise`, if any) closed on exit when --tensorboard is on (rank 0
    only), else nothing (None)."""
    if not config.outputs.tensorboard or not is_main_process():
        return contextlib.nullcontext()
    sample = samples(scored, config.outputs.num_samples) if scored is not None else None
    return contextlib.closing(LiveCurves(config.outputs.save_dir, record, sample, noise, config.training.log_interval,
                                         budget, first_epoch))
