"""Honest image-quality metrics on [0, 1] images, and the evaluation of a trained attack."""
import functools
import hashlib
import math
import os
import warnings
from typing import NamedTuple

import lpips
import torch
import torch.nn.functional as F
import torchvision
from pytorch_msssim import ms_ssim, ssim
from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim
from scipy import stats

from data import held_out_images
from defences import active, build_attack
from fisher import Bound
from models import attacker_label, invert_features, random_victim, test_noise
from utils import UsageError, progress, provenance, save_csv, save_json, to_unit

MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, as in pytorch-msssim
WIN_SIZE = 11
MIN_MSE = 1e-10  # PSNR of identical images is capped at 100 dB instead of being infinite
METRICS = ('mse', 'psnr', 'ssim', 'ms_ssim')
PERCEPTUAL = 'lpips'  # scored beside METRICS where its backbone's weights are in the hub cache
LPIPS_BACKBONE = torchvision.models.AlexNet_Weights.IMAGENET1K_V1  # LPIPS v0.1 'alex', as the attack papers use
UTILITY = ('top1_agreement', 'top5_agreement', 'kl')  # the victim's predictions with vs without the defence
STOP_KEY = 'stop_psnr'  # each epoch's mean PSNR on the stopping images (--stop_patience), in the training history


def psnr(x, y):
    """Per-image PSNR in dB for [0, 1] images: 10 log10(1 / MSE), MSE over each image's own pixels."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(MIN_MSE))


def msssim_scales(size):
    """MS-SSIM scales usable at this image size: each of the 4 halvings needs the side > 10 * 2^k."""
    return max(1, min(len(MSSSIM_WEIGHTS), int(math.floor(math.log2((size - 1) / (WIN_SIZE - 1)))) + 1))


def ms_ssim_per_image(x, y, scales=None):
    """Per-image MS-SSIM (data_range 1). Below 161 px the coarsest scales do not fit; the scales that do are
    used with their weights renormalised to sum to 1 (see `msssim_scales`). pytorch-msssim's public ms_ssim refuses
    images that small whatever its weights, so fewer scales go through its SSIM helpers, as ms_ssim itself does."""
    if scales is None:
        scales = msssim_scales(min(x.shape[-2:]))
        if scales == len(MSSSIM_WEIGHTS):
            return ms_ssim(x, y, data_range=1.0, size_average=False, win_size=WIN_SIZE)
    weights = x.new_tensor(MSSSIM_WEIGHTS[:scales])
    weights = weights / weights.sum()
    win = _fspecial_gauss_1d(WIN_SIZE, 1.5).repeat(x.shape[1], 1, 1, 1).to(x)
    factors = []
    for level in range(scales):  # the same recursion as pytorch_msssim.ms_ssim, stopped early
        ssim_map, cs = _ssim(x, y, data_range=1.0, win=win, size_average=False)
        if level < scales - 1:
            factors.append(torch.relu(cs))
            padding = [s % 2 for s in x.shape[2:]]
            x, y = F.avg_pool2d(x, 2, padding=padding), F.avg_pool2d(y, 2, padding=padding)
    factors.append(torch.relu(ssim_map))
    return torch.prod(torch.stack(factors) ** weights.view(-1, 1, 1), dim=0).mean(1)


@functools.lru_cache(maxsize=4)
def sha256_of_file(path, size, mtime_ns):
    """The file's sha256 (hex), computed once per version of the file (`size`, `mtime_ns`) in a process."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def is_torchvision_file(path):
    """Whether the file's sha256 begins with the hash its torchvision file name carries (torch.hub's rule)."""
    stat = os.stat(path)
    return sha256_of_file(path, stat.st_size, stat.st_mtime_ns).startswith(
        torch.hub.HASH_REGEX.search(os.path.basename(path)).group(1))


def load_lpips(device):
    """LPIPS (Zhang et al. 2018; the `lpips` package's linear layers on torchvision's ImageNet AlexNet), or None
    with one line saying which file is missing or not torchvision's: its backbone comes from the torch hub cache,
    like --use_pretrained, and is never downloaded, left random or taken from another file of that name."""
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(LPIPS_BACKBONE.url))
    if not os.path.isfile(path):
        print(f'LPIPS skipped: its AlexNet weights are not in the torch hub cache ({path} is missing; put '
              f'torchvision\'s file there, or set TORCH_HOME, to score it)')
        return None
    if not is_torchvision_file(path):
        print(f'LPIPS skipped: {path} is not torchvision\'s AlexNet file (its sha256 does not begin with the hash '
              f'in its name); replace it with torchvision\'s file to score LPIPS')
        return None
    with warnings.catch_warnings():  # lpips builds its AlexNet with torchvision's deprecated `pretrained=False`
        warnings.simplefilter('ignore', UserWarning)
        metric = lpips.LPIPS(net='alex', pnet_rand=True, verbose=False)  # the backbone's weights are loaded next
    backbone = torchvision.models.alexnet(weights=LPIPS_BACKBONE).features
    for part in metric.net.children():  # lpips splits AlexNet's `features` into slices, keeping layer indices
        for index, layer in part.named_children():
            layer.load_state_dict(backbone[int(index)].state_dict())
    return metric.to(device).eval().requires_grad_(False)


def score(recon, target, perceptual=None):
    """Per-image metrics of a batch of [0, 1] images; LPIPS too when `perceptual` (load_lpips) is given."""
    recon, target = recon.float().clamp(0, 1), target.float()
    scores = {'mse': (recon - target).pow(2).flatten(1).mean(1), 'psnr': psnr(recon, target),
              'ssim': ssim(recon, target, data_range=1.0, size_average=False, win_size=WIN_SIZE),
              'ms_ssim': ms_ssim_per_image(recon, target)}
    if perceptual is not None:
        scores[PERCEPTUAL] = perceptual(recon, target, normalize=True).flatten()
    return scores


def victim_agreement(clean_logits, defended_logits):
    """Per image: does the defended victim still predict the undefended top-1 class (at top-1, within its top-5),
    and KL(undefended || defended) between the two output distributions, in nats."""
    reference = clean_logits.argmax(1, keepdim=True)
    top5 = defended_logits.topk(min(5, defended_logits.shape[1]), dim=1).indices
    kl = F.kl_div(defended_logits.log_softmax(1), clean_logits.log_softmax(1), log_target=True, reduction='none')
    return {'top1_agreement': (defended_logits.argmax(1, keepdim=True) == reference).float().squeeze(1),
            'top5_agreement': (top5 == reference).any(1).float(), 'kl': kl.sum(1)}


def msssim_note(image_size):
    scales = msssim_scales(image_size)
    if scales == len(MSSSIM_WEIGHTS):
        return 'MS-SSIM: standard 5 scales'
    return f'MS-SSIM: {scales} of 5 scales at {image_size}px (the coarser ones need >160 px), weights renormalised'


# Each attack (--attack) and what it does: how the attacker turns the sent tensor into an image.
ATTACKS = {'decoder': 'the trained decoder',
           'optimize': 'white-box rMLE, no decoder needed (alone it is its own mode)',
           'decoder+optimize': "rMLE started from the decoder's output"}


class AttackPlan(NamedTuple):
    """How the attacker turns the sent tensor into an image (--attack and the optimisation's settings)."""
    kind: str = 'decoder'  # 'decoder' | 'optimize' | 'decoder+optimize'
    steps: int = 500
    lr: float = 0.2
    tv_weight: float = 0.3


ATTACK_KEYS = ('attack', 'attack_steps', 'attack_lr', 'tv_weight')  # the flags of AttackPlan's fields, in order
WHITE_BOX_ALONE = "white-box rMLE with the victim's weights, no decoder"  # the attacker of --attack optimize
WHITE_BOX_REFINEMENT = "white-box rMLE refinement (the victim's weights) of a"  # decoder+optimize, then the decoder


def attack_plan(cfg):
    return AttackPlan(*(cfg.get(key, default) for key, default in zip(ATTACK_KEYS, AttackPlan())))


def evaluated_plans(cfg):
    """The attacks a decoder's training run evaluates: the decoder alone, then the --attack chosen where it is
    another (each into its own evaluation_file)."""
    return [AttackPlan()] + ([attack_plan(cfg)] if cfg['attack'] != 'decoder' else [])


def attacker_name(cfg, kind):
    """The attacker of attack `kind`, as every output names it: the white-box optimisation alone, the decoder (and
    what it knows), or the white-box refinement of that decoder's output (white-box, whatever the decoder knew)."""
    if kind == 'optimize':
        return WHITE_BOX_ALONE
    return attacker_label(cfg) if kind == 'decoder' else f'{WHITE_BOX_REFINEMENT} {attacker_label(cfg)}'


def swept_attacker(cfg):
    """The attacker of a sweep's every value, as its table and figures name it ('' where the decoder is swept)."""
    if cfg['sweep'] == 'decoder':
        return ''
    if cfg['sweep'] == 'attack':
        return f'every attack from one {attacker_label(cfg)}'
    return attacker_name(cfg, cfg['attack'])


def attack_slug(kind):
    """The attack's name in file names: '' for the decoder (eval.json), '_optimize', '_decoder_optimize'."""
    return '' if kind == 'decoder' else '_' + kind.replace('+', '_')


def evaluation_file(kind):
    """The name of the json an evaluation of attack `kind` writes into its folder (the per-image CSV beside it)."""
    return f'eval{attack_slug(kind)}.json'


def received(attack, target, positions, noise=None):
    """(encoded, sent) for the [0, 1] images `target` at `positions` among the images scored: what the device's half
    computed, and what it sent after its defences. Each image's random draws (test noise, dropout masks) come from
    a generator seeded by its position, so the evaluation, every figure and every sample grid of the same images see
    exactly the same tensor, whatever the batch."""
    generators = [attack.noise_generator(int(p)) for p in positions]
    encoded = attack.encode(target, noise, generators)
    return encoded, attack.defend(encoded, noise, generators)


@torch.no_grad()
def recover(attack, sent, plan, shape):
    """The attacker's images (of `shape`) from the sent tensor: the decoder's output, the white-box
    optimisation from a neutral grey image, or the optimisation started from the decoder's output."""
    if plan.kind == 'decoder':
        return attack.decode(sent)
    start = attack.decode(sent) if plan.kind == 'decoder+optimize' else torch.full(shape, 0.5, device=sent.device)
    with torch.enable_grad():
        return invert_features(attack, sent, start, plan.steps, plan.lr, plan.tv_weight,
                               desc=f'{plan.kind} ({plan.steps} steps)')


@torch.no_grad()
def evaluate(attack, images, indices, batch_size, noise=None, desc='evaluating', utility=False, plan=AttackPlan(),
             perceptual=None, first=0, measures=()):
    """Per-image metrics (CPU tensors) of the attack's reconstructions of images[indices] (none with plan None);
    with `utility`, also the victim's agreement between what the device sends and the undefended tensor; LPIPS
    with `perceptual`; each of `measures(images, sent, positions, recon)`: more per-image figures (a dict) from
    each batch. `first`: the position of images[indices[0]] among the images scored (a slice of them under
    torchrun)."""
    if attack.decoder is not None:
        attack.decoder.eval()
    results = {}
    for start in progress(range(0, len(indices), batch_size), desc=desc):
        target = attack.to_images(images[indices[start:start + batch_size]])
        positions = range(first + start, first + start + len(target))
        encoded, sent = received(attack, target, positions, noise)
        recon = None if plan is None else recover(attack, sent, plan, target.shape)
        measured = {} if recon is None else score(recon, target, perceptual)
        if utility:  # against the undefended tensor: what was encoded, unless the input itself was noised
            undefended = attack.encode(target) if noise is not None and noise.at == 'input' else encoded
            measured.update(victim_agreement(attack.undefended_logits(target, undefended), attack.classify(sent)))
        for measure in measures:
            measured.update(measure(target, sent, positions, recon))
        for name, values in measured.items():
            results.setdefault(name, []).append(values.cpu())
    return {m: torch.cat(v) for m, v in results.items()}


def summarise(per_image):
    return {m: {'mean': v.mean().item(), 'std': v.std().item() if len(v) > 1 else 0.0} for m, v in per_image.items()}


def format_summary(summary):
    return '  '.join(f'{m.upper() if m != "ms_ssim" else "MS-SSIM"} {s["mean"]:.4f}±{s["std"]:.4f}'
                     if m != 'psnr' else f'PSNR {s["mean"]:.2f}±{s["std"]:.2f} dB'
                     for m, s in summary.items() if m in METRICS + (PERCEPTUAL,))


def format_utility(summary):
    return (f'victim top-1 agreement {summary["top1_agreement"]["mean"]:.3f}  top-5 agreement '
            f'{summary["top5_agreement"]["mean"]:.3f}  KL {summary["kl"]["mean"]:.4f} nats')


def utility_charged(cfg):
    """False where the victim's agreement would compare a --weights victim with itself: no defence acts on its
    tensor and no original victim is named (--reference), so 1.000 would say nothing about a defended file."""
    return not (cfg['weights'] and not cfg.get('victim_defence') and test_noise(cfg) is None and not active(cfg))


def utility_note(cfg):
    if cfg.get('victim_defence'):
        return ('victim utility: agreement of the defended victim\'s predictions with the original victim\'s '
                '(before defence training) on the same images (no labels needed)')
    if not utility_charged(cfg):
        return (f'victim utility: not measured: --weights {cfg["weights"]} with no defence on its tensor would be '
                'compared with itself; if the file is a defended victim, name the victim it was made from with '
                '--reference pretrained or --reference FILE')
    if not random_victim(cfg):
        return 'victim utility: agreement of its predictions with vs without the defence (no labels needed)'
    return 'victim utility: the victim is random-initialised, so its agreement figures are not meaningful'


def provenance_note(records):
    """Where and with what the records (eval or defence json) behind a table were made: each machine, arithmetic,
    library version and commit among them, and the span of their times."""
    made = [r['provenance'] for r in records if r.get('provenance')]
    missing = '' if len(made) == len(records) else (
        f' ({len(records) - len(made)} of {len(records)} records do not say: written before the tool recorded it)')
    if not made:
        return 'Made on: not recorded' + missing

    def each(values):
        return ' / '.join(sorted(set(values)))
    times = sorted(m['time'] for m in made)
    span = times[0] if times[0] == times[-1] else f'{times[0]} to {times[-1]}'
    arithmetic = each(r['precision'] for r in records if r.get('precision'))
    return (f'Made on: {each(m["machine"] for m in made)}' + (f'; arithmetic {arithmetic}' if arithmetic else '')
            + f'; {each(m["torch"] for m in made)}; commit {each(m["commit"] for m in made)}; {span}{missing}')


def result_columns(result):
    """An eval{_attack}.json's figures as a table row: how long its decoder trained (None where the evaluation
    predates that record), each metric's mean, the PSNR's std, the images scored."""
    means = {name: stats['mean'] for name, stats in result['metrics'].items()}
    training = result.get('training', {})
    return {'epochs': training.get('epochs'), 'train_minutes': training.get('minutes'),
            'psnr': means['psnr'], 'psnr_std': result['metrics']['psnr']['std'],
            'psnr_ceiling': means.get('psnr_ceiling'), 'unbounded': isinstance(result.get('bound'), str),
            'ssim': means['ssim'],
            'ms_ssim': means['ms_ssim'], 'lpips': means.get(PERCEPTUAL), 'mse': means['mse'],
            **{name: means.get(name) for name in UTILITY}, 'n_images': result['n_images']}


RESULT_HEADER = ('epochs | training (min) | PSNR (dB) | unbiased ceiling (dB, dFIL) | SSIM | MS-SSIM | LPIPS | '
                 'top-1 agreement | top-5 agreement | KL (nats)')
RESULT_FORMATS = {'epochs': '{:.3g}', 'train_minutes': '{:.1f}', 'ssim': '{:.3f}', 'ms_ssim': '{:.3f}', 'lpips': '{:.3f}',
                  'top1_agreement': '{:.3f}', 'top5_agreement': '{:.3f}', 'kl': '{:.4f}'}


def result_cells(row):
    """The Markdown cells of RESULT_HEADER for a row of `result_columns` ('—' for what was not measured)."""
    cells = {k: '—' if row[k] is None else form.format(row[k]) for k, form in RESULT_FORMATS.items()}
    return ' | '.join([cells['epochs'], cells['train_minutes'], f'{row["psnr"]:.2f} ± {row["psnr_std"]:.2f}',
                       ceiling_cell(row), *(cells[k] for k in ('ssim', 'ms_ssim', 'lpips', *UTILITY))])


def ceiling_cell(row):
    """The unbiased-attacker ceiling: a number only where the sent tensor carries noise the bound covers."""
    if row['psnr_ceiling'] is not None:
        return f'{row["psnr_ceiling"]:.2f}'
    return 'no bound' if row['unbounded'] else '—'  # '—': an evaluation from before the bound was recorded


SEEDS_HEADER = ('seeds | epochs | training (min) | PSNR (dB, mean ± spread over seeds) | per-image PSNR std | '
                'unbiased ceiling (dB, dFIL) | SSIM | MS-SSIM | LPIPS | top-1 agreement | top-5 agreement | KL (nats)')
CONFIDENCE = 0.95  # of the paired interval over seeds that decides "better"


def over_seeds(results):
    """One row from evaluations of one setting at several seeds (the same held-out images): each figure's mean over
    the seeds, the spread of the PSNR over the seeds (std of the per-seed means), its per-image std (the mean over
    seeds), and the PSNR of each seed (to pair with another setting's)."""
    rows = [result_columns(r) for r in results]
    psnr_by_seed = {r['config']['seed']: row['psnr'] for r, row in zip(results, rows)}
    means = {key: None if any(row[key] is None for row in rows) else sum(row[key] for row in rows) / len(rows)
             for key in rows[0]}
    means['unbounded'] = all(row['unbounded'] for row in rows)
    values = torch.tensor(list(psnr_by_seed.values()), dtype=torch.float64)
    return {**means, 'psnr_seed_std': values.std().item() if len(values) > 1 else 0.0, 'n_seeds': len(rows),
            'psnr_by_seed': psnr_by_seed}


def seed_cells(row):
    """The Markdown cells of SEEDS_HEADER for a row of `over_seeds`."""
    cells = result_cells(row).split(' | ')
    return ' | '.join([str(row['n_seeds']), *cells[:2], f'{row["psnr"]:.2f} ± {row["psnr_seed_std"]:.2f}',
                       f'{row["psnr_std"]:.2f}', *cells[3:]])


def paired_difference(baseline, other):
    """How `other`'s PSNR differs from `baseline`'s (rows of `over_seeds`), paired by seed: the mean difference over
    the seeds both have, its CONFIDENCE t interval, and the verdict, which names a setting higher or lower only
    where the interval excludes 0."""
    seeds = sorted(set(baseline['psnr_by_seed']) & set(other['psnr_by_seed']))
    differences = torch.tensor([other['psnr_by_seed'][s] - baseline['psnr_by_seed'][s] for s in seeds],
                               dtype=torch.float64)
    if len(differences) < 2:
        return {'seeds': len(seeds), 'difference': differences.mean().item() if len(seeds) else None,
                'low': None, 'high': None, 'verdict': 'fewer than two shared seeds: no verdict'}
    half = stats.t.ppf((1 + CONFIDENCE) / 2, len(seeds) - 1) * differences.std().item() / math.sqrt(len(seeds))
    mean = differences.mean().item()
    verdict = ('no measurable difference' if mean - half <= 0 <= mean + half else
               f'{"higher" if mean > 0 else "lower"} PSNR (the attack leaks {"more" if mean > 0 else "less"})')
    return {'seeds': len(seeds), 'difference': mean, 'low': mean - half, 'high': mean + half, 'verdict': verdict}


def against_first(rows, held_out=lambda row: None, first_text=lambda row: '—'):
    """row['against_first'] for rows of `over_seeds`: the PSNR difference from the first row scored on the same
    held-out images (`held_out(row)` names them), paired by seed; `first_text(row)` for those first rows."""
    for row in rows:
        first = next(r for r in rows if held_out(r) == held_out(row))
        row['against_first'] = first_text(row) if row is first else difference_text(paired_difference(first, row))


def difference_text(difference):
    if difference['low'] is None:
        return difference['verdict']
    return (f'{difference["difference"]:+.2f} dB [{difference["low"]:+.2f}, {difference["high"]:+.2f}] over '
            f'{difference["seeds"]} seeds: {difference["verdict"]}')


def write_evaluation(per_image, names, extra, save_dir, kind):
    """The evaluation_file of attack `kind` (means, stds, settings) and the per-image CSV beside it
    (eval{_attack}_per_image.csv); returns the summary."""
    summary = summarise(per_image)
    path = os.path.join(save_dir, evaluation_file(kind))
    save_json({**extra, 'n_images': len(names), 'metrics': summary}, path)
    rows = [{'image': n, **{m: f'{per_image[m][i].item():.6g}' for m in per_image}} for i, n in enumerate(names)]
    save_csv(rows, path.removesuffix('.json') + '_per_image.csv')
    return summary


def mean_image_baseline(splits, batch_size=256):
    """Per-image metrics of the trivial attack that always answers the mean training image."""
    mean = torch.zeros(splits.images.shape[1:], dtype=torch.float64)
    for start in range(0, len(splits.train_idx), batch_size):
        mean += splits.images[splits.train_idx[start:start + batch_size]].double().sum(0)
    mean = to_unit(mean / len(splits.train_idx))
    results = {m: [] for m in METRICS}
    for start in range(0, len(splits.val_idx), batch_size):
        target = to_unit(splits.images[splits.val_idx[start:start + batch_size]])
        for name, values in score(mean.expand_as(target), target).items():
            results[name].append(values)
    return {m: torch.cat(v) for m, v in results.items()}


def evaluation_images(cfg, state):
    """The Scored images a checkpoint may be scored on: held out from its training."""
    return held_out_images(cfg, state['config'], state['data'], cfg.get('eval_split', 'val'))


def load_trained_attack(cfg, state, device):
    attack = build_attack(cfg, device)
    try:
        attack.decoder.load_state_dict(state['decoder'])
    except RuntimeError as e:
        raise UsageError(f'--model_path {cfg["model_path"]}: decoder weights do not fit its configuration '
                         f'({str(e).splitlines()[0]})') from None
    return attack


class Plateau:
    """The stopping rule (--stop_patience K, --stop_delta D): a figure (`key` of each epoch's row: the PSNR on the
    stopping images, which should rise, or a defence's training objective, which should fall, by a fraction D of
    itself with `relative`) has not improved by D on its best for K epochs. Rebuilt from a history, so a resumed
    run stops where the uninterrupted one would."""

    def __init__(self, patience, delta, key, history=(), rising=True, relative=False):
        self.patience, self.delta, self.key, self.rising, self.relative = patience, delta, key, rising, relative
        self.best, self.best_epoch = None, 0
        for row in history:
            self.update(row)

    def update(self, row):
        if not self.patience:  # off: there is nothing to follow
            return
        value = row[self.key] if self.rising else -row[self.key]
        margin = self.delta * abs(self.best) if self.relative and self.best is not None else self.delta
        if self.best is None or value > self.best + margin:
            self.best, self.best_epoch = value, row['epoch']

    def reached(self, epoch):
        return bool(self.patience) and epoch - self.best_epoch >= self.patience

    def record(self, epochs, cap):
        """What the rule did: the epoch of the last improvement, and whether it stopped training or `cap` did."""
        return {'patience': self.patience, 'delta': self.delta, 'on': self.key, 'best_epoch': self.best_epoch,
                'epochs': epochs, 'plateau_reached': self.reached(epochs), 'cap_hit': not self.reached(epochs) and
                epochs >= cap}


def checkpoint_epochs(state):
    """A checkpoint's training, as the logs name it: its epoch, and the epoch of its weights where the stopping rule
    chose an earlier epoch's."""
    if state.get('weights_epoch'):
        return (f'{state["epoch"]} epochs, the weights of epoch {state["weights_epoch"]}, the best on the stopping '
                'images')
    return f'epoch {state["epoch"]}'


def training_record(history, cfg=None):
    """How long the decoder an evaluation used was trained (epochs, minutes), from its history up to the epoch it
    was saved at, and (--stop_patience) whether it stopped on a plateau or at the cap: recorded in the eval json,
    the one place tables read it from."""
    record = {'epochs': len(history), 'minutes': sum(h['seconds'] for h in history) / 60}
    if cfg and cfg.get('stop_patience') and history:
        record['stopping'] = Plateau(cfg['stop_patience'], cfg['stop_delta'], STOP_KEY, history).record(
            len(history), cfg['num_epochs'])
    return record


def evaluate_and_report(attack, scored, cfg, extra=None, plan=AttackPlan(), history=(), bound=None, measures=()):
    """The full evaluation (quality and victim utility) of the Scored images, printed and written as
    eval{_attack}.json and eval{_attack}_per_image.csv; `history`: the training history of the decoder used;
    `bound`: the Bound of these images where another attack on them already has one; `measures`: more per-batch
    hooks, as `evaluate` takes. Returns (per-image figures, summary)."""
    bound = bound or Bound(attack, cfg)
    per_image = evaluate(attack, scored.images, scored.indices, cfg['batch_size'], test_noise(cfg),
                         utility=utility_charged(cfg), plan=plan, perceptual=load_lpips(attack.device),
                         measures=[*measures, *([bound] if bound.missing is None else [])])
    attacker = attacker_name(cfg, plan.kind)
    settings = {**(extra or {}), 'attack': plan._asdict(), 'attacker': attacker, 'precision': attack.precision,
                'provenance': provenance(attack.device), 'bound': bound.record(),
                'training': training_record(history if plan.kind != 'optimize' else (), cfg),
                'data': scored.description,
                'held_out': scored.fingerprint, 'msssim': msssim_note(cfg['image_size']),
                'utility': utility_note(cfg), 'config': cfg}
    summary = write_evaluation(per_image, scored.names, settings, cfg['save_dir'], plan.kind)
    print(f'{plan.kind} attack ({attacker}) on {len(scored.names)} images: {format_summary(summary)}')
    print(bound.line(summary, per_image))
    if utility_charged(cfg):
        print(format_utility(summary))
    print(f'{utility_note(cfg)}\n{msssim_note(cfg["image_size"])}')
    return per_image, summary
