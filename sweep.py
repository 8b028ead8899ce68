"""Sweeps: one decoder per value of a setting, trained with the same budget and seed, then one comparison table
(sweep.csv, sweep.md) and figures (sweep.png, sweep_samples.png). Finished values are read back from disk."""
import os

import torch

from data import load_splits
from defences import (DEFENCE_RECORD, DEFENCES, DEFENDED_FILE, KEEP_CHANNELS, NOISE_KEYS, build_attack,
                       check_sweep_value, family, noise_flags, parse_sweep_value, training_keys, without_defences)
from evaluate import (ATTACK_KEYS, ATTACKS, RESULT_HEADER, SEEDS_HEADER, against_first, attack_plan,
                      evaluate_and_report, evaluated_plans, evaluation_file, load_trained_attack, msssim_note,
                      over_seeds, provenance_note, recover, result_cells, result_columns, seed_cells, swept_attacker,
                      utility_note)
from fisher import CEILING_NOTE, Bound
from models import DECODERS, INTERPOLATIONS, SPLITS, DecoderSpec, check_cut, probe_feature_shape, victim_label
from train import train, train_and_evaluate, train_defence
from utils import (DERIVED_KEYS, NOT_SETTINGS, UsageError, atomic_write_bytes, current_config, fresh_run_dir,
                   load_checkpoint, read_json, renamed_value, save_csv, save_json)
from visualize import (describe_sweep, plot_privacy_utility, plot_sweep, plot_sweep_samples, plot_training_time,
                       sample_sent, samples)

SWEEPS = ('split', 'keep_channels', 'noise_var', 'noise_for_bound', 'attack', 'defence', 'decoder')
DEFAULT_VALUES = {'decoder': ('original:transpose', 'original:bicubic', 'residual'),
                  'keep_channels': ('1', '0.5', '0.25', '0.125', '0.0625'),
                  'noise_var': ('0', '0.01', '0.05', '0.1', '0.5'),
                  'noise_for_bound': ('10', '15', '20', '25', '30'),
                  'attack': tuple(ATTACKS),
                  'defence': ('none', 'noise:0.1', 'noise:1', 'keep_channels:0.5', 'keep_channels:0.25',
                              'dropout:0.25', 'dropout:0.5', 'dropout:0.75', 'topk:0.5', 'topk:0.1', 'nopeek:1',
                              'adversarial:1', 'bottleneck:0.125')}


def parse_decoder(value):
    """'original:bicubic' -> ('original', 'bicubic'); 'residual' -> ('residual', its default upsampling)."""
    kind, _, interpolation = value.partition(':')
    interpolation = renamed_value('interpolation', interpolation)
    if kind not in DECODERS or (interpolation and interpolation not in INTERPOLATIONS[kind]):
        raise UsageError(f'--sweep_values for --sweep decoder: {value!r} is not one of '
                         + ', '.join(f'{k}[:{"|".join(i)}]' for k, i in INTERPOLATIONS.items()))
    return kind, interpolation or INTERPOLATIONS[kind][0]


def parse_values(cfg):
    """The swept values, typed and checked; the defaults when --sweep_values is not given."""
    name = cfg['sweep']
    raw = cfg['sweep_values'] or (tuple(SPLITS[cfg['arch']]) if name == 'split' else DEFAULT_VALUES[name])
    if name in ('split', 'attack'):
        valid = SPLITS[cfg['arch']] if name == 'split' else ATTACKS
        unknown = [v for v in raw if v not in valid]
        if unknown:
            raise UsageError(f'--sweep_values: {", ".join(unknown)} not {"a split of " + cfg["arch"] if name == "split" else "an attack"}'
                             f' (choose from {", ".join(valid)})')
        for split in raw if name == 'split' else ():
            check_cut(cfg['arch'], split, cfg['image_size'])
            if cfg['keep_channels'] is not None:
                KEEP_CHANNELS.check({**cfg, 'split': split}, cfg['keep_channels'], f'--keep_channels (at {split})')
        return list(raw)
    if name == 'decoder':
        for value in raw:
            parse_decoder(value)
        return list(raw)
    if name == 'defence':
        for value in raw:
            check_sweep_value(cfg, value)
        return list(raw)
    try:
        values = [float(v) for v in raw]
    except ValueError:
        raise UsageError(f'--sweep_values for --sweep {name} must be numbers, got {" ".join(raw)}') from None
    if name == 'noise_for_bound':  # a ceiling in dB may be any number
        if cfg['defence'] != 'none':
            raise UsageError(f'--sweep noise_for_bound: the bound covers Gaussian noise alone, not --defence '
                             f'{cfg["defence"]} acting on the noisy tensor')
        return values
    for value in values:
        DEFENCES['noise' if name == 'noise_var' else name].check(cfg, value, f'--sweep_values {value:g}')
    return values


def value_label(value):
    return value if isinstance(value, str) else f'{value:g}'


def seeds(cfg):
    """The attacker's seeds a setting runs at: --seed and the --seeds - 1 after it."""
    return range(cfg['seed'], cfg['seed'] + cfg['seeds'])


def seed_dir(cfg, folder, seed):
    """The folder of one run: `folder` itself, or its seed=S folder where the setting runs at several seeds."""
    return os.path.join(folder, f'seed={seed}') if cfg['seeds'] > 1 else folder


def value_config(cfg, value, seed=None):
    """The configuration of one run of the sweep (at `seed`, default --seed), in its own folder under the sweep's
    --save_dir."""
    seed = cfg['seed'] if seed is None else seed
    folder = os.path.join(cfg['save_dir'], f'{cfg["sweep"]}={value_label(value).replace("+", "_")}')
    run = {**cfg, 'mode': 'train', 'sweep': None, 'sweep_values': None, 'channel_indices': None,
           'bound_calibration': None, 'seed': seed, 'seeds': 1, 'save_dir': seed_dir(cfg, folder, seed)}
    if cfg['sweep'] == 'split':
        run['split'] = value
    elif cfg['sweep'] == 'keep_channels':
        run['keep_channels'] = value
    elif cfg['sweep'] == 'noise_var':  # where --noise_at puts it, with the means given
        run.update(noise_flags(value))
    elif cfg['sweep'] == 'noise_for_bound':  # the noise is calibrated on the run's own victim and images
        run['noise_for_bound'] = value
    elif cfg['sweep'] == 'attack':
        run['attack'] = value
    elif cfg['sweep'] == 'decoder':  # the same data, victim, recipe and budget (--minutes or --num_epochs)
        kind, interpolation = parse_decoder(value)
        own_family = cfg['decoder'] == kind  # the sweep's width and blocks are its own family's
        run.update(decoder=kind, interpolation=interpolation,
                   decoder_width=cfg['decoder_width'] if own_family else None,
                   decoder_blocks=cfg['decoder_blocks'] if own_family else None)
        run.update(DecoderSpec.from_config(run).settings())
    else:  # one defence at a time, on while the (adaptive) attacker trains and when it is measured
        defence, strength = parse_sweep_value(value)
        run = without_defences(run)
        run.update(defence.settings(strength) if defence else {})
        if defence and defence.trained:  # the attacker trains from scratch against the value's defended victim
            run['weights'] = os.path.join(run['save_dir'], 'victim', DEFENDED_FILE)
    return run


def defence_training_config(cfg, run):
    """The --train_defence run that writes the defended victim a trained-defence value attacks: the original victim."""
    return {**run, 'mode': 'train_defence', 'weights': cfg['weights'], 'save_dir': os.path.dirname(run['weights'])}


def ensure_defended_victim(cfg, run, device):
    """Train the value's defended victim unless one trained with these settings is on disk."""
    trainee = defence_training_config(cfg, run)
    record = read_json(os.path.join(trainee['save_dir'], DEFENCE_RECORD))
    if record is None or comparable(record['config']) != comparable(trainee) or not os.path.isfile(run['weights']):
        train_defence(trainee, device)


def decoder_run(cfg, run):
    """The run whose decoder an attack uses: in an attack sweep all attacks share one, trained once."""
    if cfg['sweep'] != 'attack' or run['attack'] == 'decoder':
        return run
    return {**run, 'attack': 'decoder', 'save_dir': value_config(cfg, 'decoder', run['seed'])['save_dir']}


def comparable(cfg):
    """What must match for a finished value to be reused (with --minutes, the epochs are what the budget gave;
    defence training's flags only where a defended victim is trained); a record's under the current names."""
    cfg = current_config(cfg)
    ignored = NOT_SETTINGS | ({'num_epochs'} if cfg.get('minutes') else set()) | (
        set() if cfg.get('train_defence') else training_keys()) | (
        NOISE_KEYS if cfg.get('noise_for_bound') is not None else set())  # derived then
    return {k: v for k, v in cfg.items() if k not in ignored}


def finished_result(run):
    """The eval{_attack}.json of a value already done with exactly this configuration, else None."""
    result = read_json(os.path.join(run['save_dir'], evaluation_file(run['attack'])))
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


def tensor_columns(run):
    """The sent tensor's shape and how many of its channels are sent, from a run's configuration."""
    channels, height, width = run.get('sent_shape') or probe_feature_shape(run['arch'], run['split'], run['image_size'])
    return {'tensor': f'{channels}x{height}x{width}',
            'channels_sent': len(run['channel_indices']) if run.get('channel_indices') else channels}


def table_row(cfg, value, results):
    """The row of a value: its evaluation's figures, or their means and spread over its seeds."""
    run = results[0]['config']
    if cfg['sweep'] == 'defence':
        defence, strength = parse_sweep_value(value)
        labels = {'defence': defence.name if defence else 'none', 'family': family(run),
                  'strength': '' if strength is None else f'{strength:g}'}
    elif cfg['sweep'] == 'noise_for_bound':  # the noise each ceiling was calibrated to (on the first seed's run)
        labels = {cfg['sweep']: f'{value:g} dB (sigma {run["bound_calibration"]["sigma"]:.3g})'}
    else:
        labels = {cfg['sweep']: value_label(value)}
    figures = result_columns(results[0]) if cfg['seeds'] == 1 else over_seeds(results)
    return {**labels, **tensor_columns(run), **figures, **decoder_psnr(cfg, results), **defence_cost(cfg, run)}


def decoder_psnr(cfg, results):
    """Where the swept attack refines the decoder's output, the decoder's own mean PSNR on the same images (its
    eval.json beside), over the seeds: the figure draws both attacks."""
    if cfg['sweep'] in ('attack', 'defence') or cfg['attack'] in ('decoder', 'optimize'):
        return {}
    own = [read_json(os.path.join(r['config']['save_dir'], evaluation_file('decoder'))) for r in results]
    return {'decoder_psnr': None if None in own else sum(o['metrics']['psnr']['mean'] for o in own) / len(own)}


def defence_cost(cfg, run):
    """A trained defence's training minutes (from its defence.json), for the table's notes."""
    if cfg['sweep'] != 'defence':
        return {}
    if not run.get('train_defence'):
        return {'defence_minutes': None}
    record = read_json(os.path.join(os.path.dirname(run['weights']), DEFENCE_RECORD))
    return {'defence_minutes': record['minutes'] if record else float('nan')}


def training_history(cfg, run):
    """The epochs of the decoder the value attacked with (none for the white-box attack alone)."""
    if run['attack'] == 'optimize':
        return []
    metrics = read_json(os.path.join(decoder_run(cfg, run)['save_dir'], 'metrics.json'))
    return metrics['history'] if metrics else []


def row_label(cfg, row):
    return f'{row["defence"]} {row["strength"]}'.strip() if cfg['sweep'] == 'defence' else row[cfg['sweep']]


def seeds_text(cfg):
    return f'seed {cfg["seed"]}' if cfg['seeds'] == 1 else f'seeds {cfg["seed"]}-{cfg["seed"] + cfg["seeds"] - 1}'


def markdown_table(rows, cfg, description, records, reused=(), decoder_runs=()):
    """sweep.md: the title (victim, attacker, budget, seeds, data), where it was made (`records`: the eval jsons
    behind the rows), the table, then its notes."""
    label_columns = ('defence', 'family', 'strength') if cfg['sweep'] == 'defence' else (cfg['sweep'],)
    attacker = f', {swept_attacker(cfg)}' if swept_attacker(cfg) else ''
    budget = f'about {cfg["minutes"]:g} minutes of training each' if cfg['minutes'] else f'{cfg["num_epochs"]} epochs'
    several = cfg['seeds'] > 1
    header = (f'{SEEDS_HEADER} | PSNR against {row_label(cfg, rows[0])} (95 % interval over paired seeds)'
              if several else RESULT_HEADER)
    lines = [f'Sweep of `{cfg["sweep"]}`: {cfg["arch"]} ({victim_label(cfg)})'
             + (f' cut at {cfg["split"]}' if cfg['sweep'] != 'split' else '')
             + f'{attacker}, {cfg["image_size"]} px, {budget}, {seeds_text(cfg)}; {description}.', '',
             provenance_note(records) + '.', '',
             f'| {" | ".join(label_columns)} | tensor | channels sent | {header} |',
             '|' + '---|' * (2 + len(label_columns) + header.count('|') + 1)]
    for r in rows:
        figures = f'{seed_cells(r)} | {r["against_first"]}' if several else result_cells(r)
        lines.append(f'| {" | ".join(r[c] for c in label_columns)} | {r["tensor"]} | {r["channels_sent"]} | '
                     f'{figures} |')
    notes = [msssim_note(cfg['image_size']), utility_note(cfg), CEILING_NOTE]
    if all(r['lpips'] is None for r in rows):
        notes.append('LPIPS not scored: its AlexNet weights were not in the torch hub cache')
    if cfg['sweep'] == 'decoder':
        notes.append('decoders: ' + '; '.join(f'{value_label(v)} = {DecoderSpec.from_config(r).label()}'
                                             for v, r in decoder_runs))
    if cfg['sweep'] in ('attack', 'defence'):
        notes.append(f'optimisation attacks: {cfg["attack_steps"]} Adam steps, lr {cfg["attack_lr"]:g}, '
                     f'TV weight {cfg["tv_weight"]:g}' if cfg['sweep'] == 'attack' else
                     'each defence is on while the decoder trains and when it is measured (an adaptive attacker); '
                     'noise is on the intercepted tensor, variance as given; dropout scales survivors by 1/(1-p); '
                     'topk keeps that fraction of the elements of each sample')
    trained = [r for r in rows if r.get('family') == 'trained']
    if trained:
        notes.append(f'trained defences: the victim fine-tuned for {cfg["defend_epochs"]} epochs (Adam, lr '
                     f'{cfg["defend_lr"]:g}, {"both halves" if cfg["defend_server"] else "the device half"}) to keep '
                     'the original victim\'s predictions (KL) beside its privacy term, in '
                     + ', '.join(f'{r["defence"]} {r["strength"]} {r["defence_minutes"]:.1f} min' for r in trained)
                     + '; each then attacked by a decoder trained from scratch against it; its agreement and KL are '
                     'against the original victim')
    if any(r.get('decoder_psnr') is not None for r in rows):
        notes.append('the decoder alone, before the refinement (PSNR, dB): ' + ', '.join(
            f'{row_label(cfg, r)}: {r["decoder_psnr"]:.2f}' for r in rows if r.get('decoder_psnr') is not None))
    if reused:
        notes.append(f'rows read from an earlier, unfinished run of this sweep, not re-run: {", ".join(reused)}')
    lines += ['', '. '.join(notes) + '.', '']
    return '\n'.join(lines)


def trained_decoder(cfg, run):
    """(path, state) of the model.pth the value `run` attacks with; `run` takes on what that training run derived
    (its channels, its victim's fingerprint)."""
    path = os.path.join(decoder_run(cfg, run)['save_dir'], 'model.pth')
    state = load_checkpoint(path)
    run.update({k: state['config'].get(k) for k in DERIVED_KEYS})
    return path, state


def value_splits(cfg, run):
    """The train / validation images of the value `run`: those its decoder recorded, or split anew for the
    white-box attack alone."""
    return load_splits(run, None if run['attack'] == 'optimize' else trained_decoder(cfg, run)[1]['data'])


def value_attack(cfg, run, device, splits=None):
    """The attack of the value `run`: the white-box attack on the victim alone (its channels chosen on `splits`'
    training images unless `run` has them), or the decoder its training run saved, with `run`'s attack settings."""
    if run['attack'] == 'optimize':
        return build_attack(run, device, None if splits is None else splits.calibration_images(run['batch_size']))
    path, state = trained_decoder(cfg, run)
    return load_trained_attack({**state['config'], **{k: run[k] for k in ATTACK_KEYS}, 'model_path': path},
                               state, device)


@torch.no_grad()
def sample_reconstructions(cfg, runs, sample, device):
    """Each value's reconstruction of the same Sample, from the tensor that value's evaluation scored; `runs` are
    the configurations the values were evaluated with (their channels chosen)."""
    rows = []
    for run in runs:
        attack = value_attack(cfg, run, device)
        attack.decoder.eval()
        target, sent = sample_sent(attack, sample, run)
        rows.append(recover(attack, sent, attack_plan(run), target.shape).cpu())
    return rows


def run_value(cfg, run, device):
    """Train the decoder this value needs unless a finished one is shared, then evaluate the value's attack;
    returns its eval json."""
    if run.get('train_defence'):
        ensure_defended_victim(cfg, run, device)
    if run['attack'] != 'optimize':  # the white-box attack needs no decoder
        trainee = decoder_run(cfg, run)
        if trainee is run or finished_result(trainee) is None:
            attack, splits, history, _ = train(trainee, device)
            validation, bound = splits.validation(), Bound(attack, trainee)
            for plan in evaluated_plans(trainee):  # the decoder's eval.json beside a refinement's: decoder_psnr
                evaluate_and_report(attack, validation, trainee, {'sweep': cfg['sweep']}, plan, history, bound)
            if trainee is run:
                return finished_result(run)
    splits = value_splits(cfg, run)
    attack = value_attack(cfg, run, device, splits)
    history = () if run['attack'] == 'optimize' else trained_decoder(cfg, run)[1]['history']
    evaluate_and_report(attack, splits.validation(), run, {'sweep': cfg['sweep']}, attack_plan(run), history)
    return finished_result(run)


def value_results(cfg, value, device, position, reused):
    """The eval json of every seed of one value: read back where finished with this configuration, else run."""
    results = []
    for seed in seeds(cfg):
        run = value_config(cfg, value, seed)
        at_seed = f' (seed {seed})' if cfg['seeds'] > 1 else ''
        result = finished_result(run)
        if result is not None:
            print(f'sweep {cfg["sweep"]} {position}: {value_label(value)}{at_seed} already done, read from '
                  f'{run["save_dir"]}')
            reused.append(value_label(value) + at_seed)
        else:
            print(f'sweep {cfg["sweep"]} {position}: {cfg["sweep"]}={value_label(value)}{at_seed}')
            os.makedirs(run['save_dir'], exist_ok=True)
            result = run_value(cfg, run, device)
        results.append(result)
    return results


def run_sweep(cfg, device):
    values = parse_values(cfg)
    cfg['save_dir'] = sweep_dir(cfg)
    save_json({'sweep': cfg['sweep'], 'values': [value_label(v) for v in values], 'config': cfg},
              os.path.join(cfg['save_dir'], 'sweep.json'))
    rows, evaluated, reused, records = [], [], [], []
    for i, value in enumerate(values):
        results = value_results(cfg, value, device, f'{i + 1}/{len(values)}', reused)
        records += results
        rows.append(table_row(cfg, value, results))
        evaluated.append({**value_config(cfg, value), **results[0]['config']})  # the first seed's, for figures
    if cfg['seeds'] > 1:
        against_first(rows)  # every value is scored on the same held-out images
    validation = value_splits(cfg, evaluated[0]).validation()
    save_csv(rows, os.path.join(cfg['save_dir'], 'sweep.csv'))
    table = markdown_table(rows, cfg, validation.description, records, reused, list(zip(values, evaluated)))
    atomic_write_bytes(os.path.join(cfg['save_dir'], 'sweep.md'), table.encode())
    labels = [row_label(cfg, r) for r in rows]
    if cfg['sweep'] in ('attack', 'defence'):
        plot_privacy_utility(rows, labels, describe_sweep(cfg), os.path.join(cfg['save_dir'], 'sweep.png'))
    else:
        plot_sweep(rows, labels, cfg, os.path.join(cfg['save_dir'], 'sweep.png'))
    if cfg['sweep'] == 'decoder':
        plot_training_time([training_history(cfg, run) for run in evaluated], labels, cfg,
                           os.path.join(cfg['save_dir'], 'sweep_time.png'))
    sample = samples(validation, cfg['num_samples'])
    plot_sweep_samples(sample, sample_reconstructions(cfg, evaluated, sample, device), labels, cfg,
                       os.path.join(cfg['save_dir'], 'sweep_samples.png'))
    print(table)
    return rows


def run_seeds(cfg, device):
    """--seeds N with --train or --train_defence: the setting once per seed of the attacker (or of defence training),
    each in SAVE_DIR/seed=S and scored on the same held-out images, then one table over the seeds (seeds.md,
    seeds.csv). Sweeps run their seeds themselves."""
    runs = [{**cfg, 'seed': seed, 'seeds': 1, 'save_dir': seed_dir(cfg, cfg['save_dir'], seed)} for seed in seeds(cfg)]
    for i, run in enumerate(runs):
        print(f'seed {run["seed"]} ({i + 1} of {len(runs)}), into {run["save_dir"]}')
        (train_defence if cfg['mode'] == 'train_defence' else train_and_evaluate)(run, device)
    records = [read_json(path) for run in runs for path in run_records(cfg, run)]
    rows = defence_seed_rows(runs) if cfg['mode'] == 'train_defence' else attack_seed_rows(cfg, runs)
    save_csv(rows, os.path.join(cfg['save_dir'], 'seeds.csv'))
    table = seeds_table(cfg, rows, records)
    atomic_write_bytes(os.path.join(cfg['save_dir'], 'seeds.md'), table.encode())
    print(table)
    return rows


def run_records(cfg, run):
    """The json files one seed's run wrote its results into: its defence.json, or each attack's eval json."""
    if cfg['mode'] == 'train_defence':
        return [os.path.join(run['save_dir'], DEFENCE_RECORD)]
    return [os.path.join(run['save_dir'], evaluation_file(plan.kind)) for plan in evaluated_plans(cfg)]


def attack_seed_rows(cfg, runs):
    """One row per attack evaluated: its figures' means and spread over the seeds."""
    return [{'attack': plan.kind, **over_seeds([read_json(os.path.join(run['save_dir'], evaluation_file(plan.kind)))
                                                for run in runs])} for plan in evaluated_plans(cfg)]


def defence_seed_rows(runs):
    """One row per seed of defence training (its held-out measurements after training), then their mean and
    spread over the seeds."""
    records = [read_json(os.path.join(run['save_dir'], DEFENCE_RECORD)) for run in runs]
    rows = [{'seed': run['seed'], **record['held_out']['after'], 'minutes': record['minutes']}
            for run, record in zip(runs, records)]
    figures = [k for k in rows[0] if k != 'seed']
    values = {k: torch.tensor([row[k] for row in rows], dtype=torch.float64) for k in figures}
    return rows + [{'seed': 'mean', **{k: v.mean().item() for k, v in values.items()}},
                   {'seed': 'spread (std)', **{k: v.std().item() for k, v in values.items()}}]


def seeds_table(cfg, rows, records):
    title = (f'{cfg["mode"]} over {seeds_text(cfg)}: {cfg["arch"]} ({victim_label(cfg)}) cut at {cfg["split"]}, '
             f'{cfg["image_size"]} px; every seed scored on the same held-out images (--split_seed '
             f'{cfg["split_seed"]}).\n\n{provenance_note(records)}.')
    if cfg['mode'] == 'train_defence':
        header = ' | '.join(rows[0])
        lines = [f'| {header} |', '|' + '---|' * len(rows[0])] + [
            '| ' + ' | '.join(v if isinstance(v, str) else f'{v:.4g}' for v in row.values()) + ' |' for row in rows]
    else:
        lines = [f'| attack | {SEEDS_HEADER} |', '|' + '---|' * (SEEDS_HEADER.count('|') + 2)] + [
            f'| {row["attack"]} | {seed_cells(row)} |' for row in rows]
    return '\n'.join([title, '', *lines, '', utility_note(cfg) + '.', ''])
