"""Sweeps: one decoder per value of a setting, trained with the same budget and seed, then one comparison table
(sweep.csv, sweep.md) and figures (sweep.png, sweep_samples.png); and --seeds, a setting repeated at several
attacker seeds. Each value's run is the sweep's configuration with one field replaced. Finished values are read
back from disk."""
import math
import os
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from .attacks import ATTACKS, attacker_label, attacker_name, build_attack, recover
from .bound import CEILING_NOTE
from .checkpoint import load_checkpoint, load_trained_attack
from .config import Config, Derived
from .data import load_splits
from .defence_training import train_defence
from .defences import (DEFENCE_RECORD, DEFENCES, DEFENDED_FILE, KEEP_CHANNELS, NO_DEFENCE, NOISE_KEYS,
                       check_sweep_value, family, noise_flags, parse_sweep_value, training_flags)
from .evaluate import (PRIOR_IMAGES, evaluate_and_report, evaluated_plans, evaluation_file, mean_training_image,
                       run_bound, utility_note)
from .metrics import msssim_note
from .models.cuts import SPLITS, check_cut, cut_at, probe, victim_name
from .models.decoders import DECODERS, INTERPOLATIONS, resolve
from .models.victims import victim_label
from .records import NOT_SETTINGS, from_record, renamed_value, to_record, with_flags
from .tables import (BASELINE_NOTE, RESULT_HEADER, SEEDS_HEADER, against_first, flagged_line, holm_note, made_columns,
                     markdown_lines, over_seeds, provenance_note, result_cells, result_columns, seed_cells,
                     tensor_columns)
from .train import train, train_and_evaluate
from .utils import UsageError, atomic_write_bytes, fresh_run_dir, read_json, save_csv, save_json
from .visualize import (plot_privacy_utility, plot_sweep, plot_sweep_samples, plot_training_time, sample_sent,
                        samples)

def parse_decoder(value):
    """'original:bicubic' -> ('original', 'bicubic'); 'residual' -> ('residual', its default upsampling)."""
    kind, _, interpolation = value.partition(':')
    interpolation = renamed_value('interpolation', interpolation)
    if kind not in DECODERS or (interpolation and interpolation not in INTERPOLATIONS[kind]):
        raise UsageError(f'--sweep_values for --sweep decoder: {value!r} is not one of '
                         + ', '.join(f'{k}[:{"|".join(i)}]' for k, i in INTERPOLATIONS.items()))
    return kind, interpolation or INTERPOLATIONS[kind][0]


def choices(valid, what):
    """The values a sweep reads as names (`valid` ones only, `what` they are in the one-line error)."""
    def parse(config, raw):
        unknown = [v for v in raw if v not in valid(config)]
        if unknown:
            raise UsageError(f'--sweep_values: {", ".join(unknown)} not {what(config)} (choose from '
                             f'{", ".join(valid(config))})')
        return list(raw)
    return parse


def numbers(check):
    """The values a sweep reads as numbers (a ValueError where one is not), each checked by `check(config, value)`."""
    def parse(config, raw):
        values = [float(v) for v in raw]
        for value in values:
            check(config, value)
        return values
    return parse


def victims_cut(config):
    return cut_at(config.victim, config.data.image_size)


def defence_strength(name):
    """A check of a sweep value as the defence `name` checks its strength."""
    return lambda config, value: DEFENCES[name].check(value, f'--sweep_values {value:g}', victims_cut(config))


def parse_splits(config, raw):
    """Cuts of the victim, each checked as --split is (and --keep_channels at it)."""
    for split in raw:
        victim = replace(config.victim, split=split)
        try:
            check_cut(victim, config.data.image_size)
        except UsageError as e:
            raise UsageError(f'--sweep_values: {split} not a split of {victim_name(victim)}: {e}') from None
        if config.defence.keep_channels is not None:
            KEEP_CHANNELS.check(config.defence.keep_channels, f'--keep_channels (at {split})',
                                cut_at(victim, config.data.image_size))
    return list(raw)


def named_cuts(config):
    """A split sweep's values when none are given: the cuts this tool named for the arch, else every module's cut."""
    victim = config.victim
    if not victim.model and victim.arch in SPLITS:
        return SPLITS[victim.arch]
    return tuple(cut.module for cut in probe(victim, config.data.image_size)[0] if cut.module != cut.node)


def parse_decoders(config, raw):
    for value in raw:
        parse_decoder(value)
    return list(raw)


def parse_defences(config, raw):
    for value in raw:
        check_sweep_value(value, victims_cut(config))
    return list(raw)


def finite(config, value):
    """A ceiling in dB may be any finite number."""
    if not math.isfinite(value):
        raise UsageError(f'--sweep_values for --sweep noise_for_bound: a PSNR ceiling in dB, got {value}')


def with_decoder(config, value):
    """The same data, victim, recipe and budget (--minutes or --num_epochs), another decoder; the sweep's width and
    blocks are its own family's."""
    kind, interpolation = parse_decoder(value)
    own = config.decoder.kind == kind
    return replace(config, decoder=resolve(replace(config.decoder, kind=kind, interpolation=interpolation,
                                                   width=config.decoder.width if own else None,
                                                   blocks=config.decoder.blocks if own else None)))


def with_defence(config, value):
    """One defence at a time, on while the (adaptive) attacker trains and when it is measured."""
    defence, strength = parse_sweep_value(value)
    return with_flags(config, **{**NO_DEFENCE, **(defence.settings(strength) if defence else {})})


class Axis(NamedTuple):
    """A setting a sweep can vary: its values when none are given (or a function of the sweep's configuration that
    says them), how given values are read and checked (config, raw values) -> values, and the configuration of one
    value's run (config, value) -> config. A new axis is one entry in AXES."""
    defaults: object
    parse: object
    apply: object


AXES = {
    'split': Axis(named_cuts, parse_splits,
                  lambda config, value: replace(config, victim=replace(config.victim, split=value))),
    'keep_channels': Axis(('1', '0.5', '0.25', '0.125', '0.0625'), numbers(defence_strength('keep_channels')),
                          lambda config, value: with_flags(config, keep_channels=value)),
    'noise_var': Axis(('0', '0.01', '0.05', '0.1', '0.5'), numbers(defence_strength('noise')),
                      lambda config, value: with_flags(config, **noise_flags(value))),  # where --noise_at puts it
    'noise_for_bound': Axis(('10', '15', '20', '25', '30'), numbers(finite),  # calibrated on each run's images
                            lambda config, value: replace(config, noise=replace(config.noise, for_bound=value))),
    'attack': Axis(tuple(ATTACKS), choices(lambda config: ATTACKS, lambda config: 'an attack'),
                   lambda config, value: replace(config, attack=replace(config.attack, kind=value))),
    'defence': Axis(('none', 'noise:0.1', 'noise:1', 'keep_channels:0.5', 'keep_channels:0.25', 'dropout:0.25',
                     'dropout:0.5', 'dropout:0.75', 'topk:0.5', 'topk:0.1', 'nopeek:1', 'adversarial:1',
                     'bottleneck:0.125'), parse_defences, with_defence),
    'decoder': Axis(('original:transpose', 'original:bicubic', 'residual'), parse_decoders, with_decoder),
}
SWEEPS = tuple(AXES)


def parse_values(config, name, given):
    """The values of the sweep of setting `name`, typed and checked against `config` (a config.Config); the
    defaults when no --sweep_values are `given`."""
    axis = AXES[name]
    raw = given or (axis.defaults(config) if callable(axis.defaults) else axis.defaults)
    try:
        return axis.parse(config, raw)
    except ValueError:
        raise UsageError(f'--sweep_values for --sweep {name} must be numbers, got {" ".join(raw)}') from None


def value_label(value):
    return value if isinstance(value, str) else f'{value:g}'


def seed_dir(folder, seed, seeds):
    """The folder of one run: `folder` itself, or its seed=S folder where the setting runs at several seeds."""
    return os.path.join(folder, f'seed={seed}') if seeds > 1 else folder


def at_seed(config, seed, folder):
    """`config` run by the attacker of `seed` into `folder`."""
    return replace(config, training=replace(config.training, seed=seed),
                   outputs=replace(config.outputs, save_dir=folder))


def comparable(record):
    """What must match for a finished run (its record, records.to_record's) to be reused: its settings under the
    current names (with --minutes, the epochs are what the budget gave; defence training's flags only where a
    defended victim is trained; the noise, where it is calibrated to a bound)."""
    config, derived = from_record(record)
    ignored = NOT_SETTINGS | ({'num_epochs'} if config.training.minutes else set()) | (
        set() if config.defence.train_defence else training_flags()) | (
        NOISE_KEYS if config.noise.for_bound is not None else set())
    return {k: v for k, v in to_record(config, derived).items() if k not in ignored}


def finished_result(run):
    """The eval{_attack}.json of the run (a config.Config) already done with exactly this configuration, else
    None."""
    result = read_json(os.path.join(run.outputs.save_dir, evaluation_file(run.attack.kind)))
    if result and comparable(result['config']) == comparable(to_record(run)):
        return result
    return None


@dataclass(frozen=True)
class Sweep:
    """A sweep of the setting `name` over `values`, each run at `seeds` attacker seeds from `config.training.seed`,
    every other setting as `config` (a config.Config) has it, into `config.outputs.save_dir`."""
    config: Config
    name: str
    values: list
    seeds: int = 1

    def seed_range(self):
        return range(self.config.training.seed, self.config.training.seed + self.seeds)

    def run(self, value, seed=None):
        """The configuration of one run of the sweep (at `seed`, default the sweep's first), in its own folder."""
        seed = self.config.training.seed if seed is None else seed
        folder = seed_dir(os.path.join(self.config.outputs.save_dir,
                                       f'{self.name}={value_label(value).replace("+", "_")}'), seed, self.seeds)
        config = AXES[self.name].apply(self.config, value)
        if config.defence.train_defence:  # the attacker trains from scratch against the value's defended victim
            weights = os.path.join(folder, 'victim', DEFENDED_FILE)
            config = replace(config, victim=replace(config.victim, weights=weights))
        return at_seed(config, seed, folder)

    def decoder_run(self, run):
        """The run whose decoder the attack of `run` uses: in an attack sweep all attacks share one, trained once."""
        if self.name != 'attack' or run.attack.kind == 'decoder':
            return run
        shared = self.run('decoder', run.training.seed)
        return replace(run, attack=replace(run.attack, kind='decoder'), outputs=shared.outputs)

    def attacker(self):
        """The attacker of every value, as the table and figures name it ('' where the decoder is swept)."""
        if self.name == 'decoder':
            return ''
        if self.name == 'attack':
            return f'every attack from one {attacker_label(self.config.decoder, self.config.training.feature_weight)}'
        return attacker_name(self.config.attack.kind, self.config.decoder, self.config.training.feature_weight)

    def budget(self, short=False):
        """Each value's training budget, as the table (or, `short`, the figures) say it."""
        minutes, epochs = self.config.training.minutes, self.config.training.num_epochs
        if self.config.attack.kind == 'optimize' and self.name != 'attack':
            return 'no training' if short else 'no training (the white-box optimisation alone)'
        if minutes:
            return f'~{minutes:g} min each' if short else f'about {minutes:g} minutes of training each'
        return f'{epochs} epochs'

    def title(self):
        """The figures' title: what was swept, on which victim, by which attacker, at which budget."""
        config = self.config
        cut_at_split = '' if self.name == 'split' else f' cut at {config.victim.split}'
        optimisation = (f' | optimisation: {config.attack.steps} steps, TV {config.attack.tv_weight:g}'
                        if self.name == 'attack' else '')
        attacker = f' | {self.attacker()}' if self.attacker() else ''
        victim = f'{victim_name(config.victim)} ({victim_label(config.victim)})'
        return (f'sweep of {self.name}: {victim}{cut_at_split}{attacker} | '
                f'{config.data.image_size}px | {self.budget(short=True)}{optimisation}')

    def seeds_text(self):
        first = self.config.training.seed
        return f'seed {first}' if self.seeds == 1 else f'seeds {first}-{first + self.seeds - 1}'

    def row_label(self, row):
        return f'{row["defence"]} {row["strength"]}'.strip() if self.name == 'defence' else row[self.name]


def defence_training_config(original, run):
    """The --train_defence run that writes the defended victim a trained-defence value attacks: of the original
    victim (`original`'s weights)."""
    return replace(run, victim=replace(run.victim, weights=original.victim.weights),
                   outputs=replace(run.outputs, save_dir=os.path.dirname(run.victim.weights)))


def ensure_defended_victim(original, run, device):
    """Train the value's defended victim unless one trained with these settings is on disk."""
    trainee = defence_training_config(original, run)
    record = read_json(os.path.join(trainee.outputs.save_dir, DEFENCE_RECORD))
    if (record is None or comparable(record['config']) != comparable(to_record(trainee))
            or not os.path.isfile(run.victim.weights)):
        train_defence(trainee, device)


def table_row(sweep, value, results):
    """The row of a value: its evaluation's figures, or their means and spread over its seeds."""
    config, derived = from_record(results[0]['config'])
    if sweep.name == 'defence':
        defence, strength = parse_sweep_value(value)
        labels = {'defence': defence.name if defence else 'none',
                  'family': family(config.defence, derived.noise(config.noise), derived.victim_defence),
                  'strength': '' if strength is None else f'{strength:g}'}
    elif sweep.name == 'noise_for_bound':  # the noise each ceiling was calibrated to (on the first seed's run)
        labels = {sweep.name: f'{value:g} dB (sigma {derived.bound_calibration["sigma"]:.3g})'}
    else:
        labels = {sweep.name: value_label(value)}
    figures = result_columns(results[0]) if sweep.seeds == 1 else over_seeds(results)
    return {**labels, **tensor_columns(config, derived), **figures, **decoder_psnr(sweep, results),
            **defence_cost(sweep, config), **made_columns(*results)}


def decoder_psnr(sweep, results):
    """Where the swept attack refines the decoder's output, the decoder's own mean PSNR on the same images (its
    eval.json beside), over the seeds: the figure draws both attacks."""
    if sweep.name in ('attack', 'defence') or sweep.config.attack.kind in ('decoder', 'optimize'):
        return {}
    own = [read_json(os.path.join(from_record(r['config'])[0].outputs.save_dir, evaluation_file('decoder')))
           for r in results]
    return {'decoder_psnr': None if None in own else sum(o['metrics']['psnr']['mean'] for o in own) / len(own)}


def defence_cost(sweep, run):
    """A trained defence's training minutes (from its defence.json), for the table's notes."""
    if sweep.name != 'defence':
        return {}
    if not run.defence.train_defence:
        return {'defence_minutes': None}
    record = read_json(os.path.join(os.path.dirname(run.victim.weights), DEFENCE_RECORD))
    return {'defence_minutes': record['minutes'] if record else float('nan')}


def training_history(sweep, run):
    """The epochs of the decoder the value attacked with (none for the white-box attack alone)."""
    if run.attack.kind == 'optimize':
        return []
    metrics = read_json(os.path.join(sweep.decoder_run(run).outputs.save_dir, 'metrics.json'))
    return metrics['history'] if metrics else []


def markdown_table(sweep, rows, description, records, reused=(), decoder_runs=(), tested=0):
    """sweep.md: the title (victim, attacker, budget, seeds, data), where it was made (`records`: the eval jsons
    behind the rows), the table, then its notes."""
    config, name = sweep.config, sweep.name
    label_columns = ('defence', 'family', 'strength') if name == 'defence' else (name,)
    attacker = f', {sweep.attacker()}' if sweep.attacker() else ''
    several = sweep.seeds > 1
    header = (f'{SEEDS_HEADER} | PSNR against {sweep.row_label(rows[0])} (95 % interval over paired seeds)'
              if several else RESULT_HEADER)
    lines = [f'Sweep of `{name}`: {victim_name(config.victim)} ({victim_label(config.victim)})'
             + (f' cut at {config.victim.split}' if name != 'split' else '')
             + f'{attacker}, {config.data.image_size} px, {sweep.budget()}, {sweep.seeds_text()}; {description}.', '',
             provenance_note(records) + '.', '',
             *markdown_lines(f'{" | ".join(label_columns)} | tensor | channels sent | {header}', [
                 f'{" | ".join(r[c] for c in label_columns)} | {r["tensor"]} | {r["channels_sent"]} | '
                 + (f'{seed_cells(r)} | {r["against_first"]}' if several else result_cells(r)) for r in rows])]
    notes = ([holm_note(tested)] if several else []) + [BASELINE_NOTE, msssim_note(config.data.image_size),
                                                        utility_note(config, Derived()), CEILING_NOTE]
    if all(r['lpips'] is None for r in rows):
        notes.append('LPIPS not scored: its AlexNet weights were not in the torch hub cache')
    if name == 'decoder':
        notes.append('decoders: ' + '; '.join(f'{value_label(v)} = {run.decoder.label()}' for v, run in decoder_runs))
    if name in ('attack', 'defence'):
        plan = config.attack
        notes.append(f'optimisation attacks: {plan.steps} Adam steps, lr {plan.lr:g}, TV weight {plan.tv_weight:g}'
                     if name == 'attack' else
                     'each defence is on while the decoder trains and when it is measured (an adaptive attacker); '
                     'noise is on the intercepted tensor, variance as given; dropout scales survivors by 1/(1-p); '
                     'topk keeps that fraction of the elements of each sample')
    trained = [r for r in rows if r.get('family') == 'trained']
    if trained:
        defence = config.defence
        notes.append(f'trained defences: the victim fine-tuned for {defence.epochs} epochs (Adam, lr '
                     f'{defence.lr:g}, {"both halves" if defence.server else "the device half"}) to keep '
                     'the original victim\'s predictions (KL) beside its privacy term, in '
                     + ', '.join(f'{r["defence"]} {r["strength"]} {r["defence_minutes"]:.1f} min' for r in trained)
                     + '; each then attacked by a decoder trained from scratch against it; its agreement and KL are '
                     'against the original victim')
    if any(r.get('decoder_psnr') is not None for r in rows):
        notes.append('the decoder alone, before the refinement (PSNR, dB): ' + ', '.join(
            f'{sweep.row_label(r)}: {r["decoder_psnr"]:.2f}' for r in rows if r.get('decoder_psnr') is not None))
    if reused:
        notes.append(f'rows read from an earlier, unfinished run of this sweep, not re-run: {", ".join(reused)}')
    lines += ['', '. '.join(notes) + '.', '']
    return '\n'.join(lines)


def trained_decoder(sweep, run):
    """(path, state) of the model.pth the value `run` attacks with."""
    path = os.path.join(sweep.decoder_run(run).outputs.save_dir, 'model.pth')
    return path, load_checkpoint(path)


def value_splits(sweep, run):
    """The train / validation images of the value `run`: those its decoder recorded, or split anew for the
    white-box attack alone."""
    record = None if run.attack.kind == 'optimize' else trained_decoder(sweep, run)[1]['data']
    return load_splits(run.data, record, run.victim.weights, stopping=bool(run.training.stop_patience))


def value_attack(sweep, run, device, splits=None, derived=Derived()):
    """(attack, derived) of the value `run`: the white-box attack on the victim alone (its channels chosen on
    `splits`' training images unless `derived` has them), or the decoder its training run saved, with `run`'s
    attack plan."""
    if run.attack.kind == 'optimize':
        calibration = None if splits is None else splits.calibration_images(run.data.batch_size)
        return build_attack(run, device, calibration, derived)
    path, state = trained_decoder(sweep, run)
    trained, derived = from_record(state['config'])
    attacked = replace(trained, attack=run.attack, outputs=run.outputs)
    return load_trained_attack(state, device, attacked, derived, path), derived


@torch.no_grad()
def sample_reconstructions(sweep, evaluated, sample, device):
    """Each value's reconstruction of the same Sample, from the tensor that value's evaluation scored; `evaluated`:
    the (config, derived) each value was evaluated with (its channels chosen, its noise calibrated)."""
    rows = []
    for run, derived in evaluated:
        attack, _ = value_attack(sweep, run, device, derived=derived)
        attack.decoder.eval()
        target, sent = sample_sent(attack, sample, derived.noise(run.noise).testing())
        rows.append(recover(attack, sent, run.attack, target.shape).cpu())
    return rows


def run_value(sweep, run, device):
    """Train the decoder this value needs unless a finished one is shared, then evaluate the value's attack;
    returns its eval json."""
    if run.defence.train_defence:
        ensure_defended_victim(sweep.config, run, device)
    extra = {'sweep': sweep.name}
    if run.attack.kind != 'optimize':  # the white-box attack needs no decoder
        trainee = sweep.decoder_run(run)
        if trainee is run or finished_result(trainee) is None:
            trained = train(trainee, device)
            noise = trained.derived.noise(trainee.noise)
            validation = trained.splits.validation()
            bound = run_bound(trained.attack, noise, trained.splits.calibration_images(PRIOR_IMAGES),
                              trainee.training.seed)
            for plan in evaluated_plans(trainee.attack):  # the decoder's eval.json beside a refinement's
                evaluate_and_report(trained.attack, validation, trainee, trained.derived, extra, plan,
                                    trained.history, bound, mean_image=trained.mean_image)
            if trainee is run:
                return finished_result(run)
    splits = value_splits(sweep, run)
    attack, derived = value_attack(sweep, run, device, splits)
    history = () if run.attack.kind == 'optimize' else trained_decoder(sweep, run)[1]['history']
    bound = run_bound(attack, derived.noise(run.noise), splits.calibration_images(PRIOR_IMAGES), run.training.seed)
    evaluate_and_report(attack, splits.validation(), run, derived, extra, run.attack, history, bound,
                        mean_image=mean_training_image(splits))
    return finished_result(run)


def value_results(sweep, value, device, position, reused):
    """The eval json of every seed of one value: read back where finished with this configuration, else run."""
    results = []
    for seed in sweep.seed_range():
        run = sweep.run(value, seed)
        at = f' (seed {seed})' if sweep.seeds > 1 else ''
        result = finished_result(run)
        if result is not None:
            print(f'sweep {sweep.name} {position}: {value_label(value)}{at} already done, read from '
                  f'{run.outputs.save_dir}')
            reused.append(value_label(value) + at)
        else:
            print(f'sweep {sweep.name} {position}: {sweep.name}={value_label(value)}{at}')
            os.makedirs(run.outputs.save_dir, exist_ok=True)
            result = run_value(sweep, run, device)
        results.append(result)
    return results


def sweep_dir(sweep):
    """Resume in the sweep's folder when it holds this same sweep; else a fresh folder beside a used one."""
    folder = sweep.config.outputs.save_dir
    previous = read_json(os.path.join(folder, 'sweep.json'))
    same = previous and previous['sweep'] == sweep.name and (
        comparable(previous['config']) == comparable(to_record(sweep.config)))
    if sweep.config.outputs.overwrite or same:
        return folder
    chosen = fresh_run_dir(folder)
    if chosen != folder:
        print(f'{folder} holds another run or sweep: writing to {chosen}')
    return chosen


def run_sweep(config, name, given_values, seeds, device):
    """--sweep NAME: the sweep of setting `name` over `given_values` (the defaults when none), at `seeds` seeds, each
    value's run as `config` (a config.Config) with that one setting replaced."""
    values = parse_values(config, name, given_values)
    sweep = Sweep(config, name, values, seeds)
    folder = sweep_dir(sweep)
    sweep = replace(sweep, config=replace(config, outputs=replace(config.outputs, save_dir=folder)))
    save_json({'sweep': name, 'values': [value_label(v) for v in values], 'seeds': seeds,
               'config': to_record(sweep.config)}, os.path.join(folder, 'sweep.json'))
    rows, evaluated, reused, records = [], [], [], []
    for i, value in enumerate(values):
        results = value_results(sweep, value, device, f'{i + 1}/{len(values)}', reused)
        records += results
        rows.append(table_row(sweep, value, results))
        first = from_record(results[0]['config'])  # the first seed's, for figures
        evaluated.append((replace(first[0], outputs=sweep.run(value).outputs), first[1]))
    tested = against_first(rows) if seeds > 1 else 0  # every value is scored on the same held-out images
    validation = value_splits(sweep, evaluated[0][0]).validation()
    save_csv(rows, os.path.join(folder, 'sweep.csv'))
    table = markdown_table(sweep, rows, validation.description, records, reused,
                           [(v, run) for v, (run, _) in zip(values, evaluated)], tested)
    atomic_write_bytes(os.path.join(folder, 'sweep.md'), table.encode())
    labels = [sweep.row_label(r) for r in rows]
    title = sweep.title() + flagged_line(rows, labels)
    if name in ('attack', 'defence'):
        plot_privacy_utility(rows, labels, title, os.path.join(folder, 'sweep.png'))
    else:
        plot_sweep(rows, labels, name, config.attack.kind, title, os.path.join(folder, 'sweep.png'))
    if name == 'decoder':
        plot_training_time([training_history(sweep, run) for run, _ in evaluated], labels, sweep.title(),
                           os.path.join(folder, 'sweep_time.png'))
    sample = samples(validation, config.outputs.num_samples)
    plot_sweep_samples(sample, sample_reconstructions(sweep, evaluated, sample, device), labels, name, sweep.title(),
                       os.path.join(folder, 'sweep_samples.png'))
    print(table)
    return rows


def run_seeds(config, seeds, device, defence=False):
    """--seeds N with --train (or --train_defence, `defence`): the setting once per seed of the attacker (or of
    defence training), each in SAVE_DIR/seed=S and scored on the same held-out images, then one table over the
    seeds (seeds.md, seeds.csv). Sweeps run their seeds themselves."""
    folder, first = config.outputs.save_dir, config.training.seed
    runs = [at_seed(config, seed, seed_dir(folder, seed, seeds)) for seed in range(first, first + seeds)]
    for i, run in enumerate(runs):
        print(f'seed {run.training.seed} ({i + 1} of {len(runs)}), into {run.outputs.save_dir}')
        (train_defence if defence else train_and_evaluate)(run, device)
    records = [read_json(path) for run in runs for path in run_records(run, defence)]
    rows = defence_seed_rows(runs) if defence else attack_seed_rows(runs)
    save_csv(rows, os.path.join(folder, 'seeds.csv'))
    table = seeds_table(config, seeds, rows, records, defence)
    atomic_write_bytes(os.path.join(folder, 'seeds.md'), table.encode())
    print(table)
    return rows


def run_records(run, defence):
    """The json files one seed's run wrote its results into: its defence.json, or each attack's eval json."""
    if defence:
        return [os.path.join(run.outputs.save_dir, DEFENCE_RECORD)]
    return [os.path.join(run.outputs.save_dir, evaluation_file(plan.kind)) for plan in evaluated_plans(run.attack)]


def attack_seed_rows(runs):
    """One row per attack evaluated: its figures' means and spread over the seeds."""
    def records(kind):
        return [read_json(os.path.join(run.outputs.save_dir, evaluation_file(kind))) for run in runs]
    return [{'attack': plan.kind, **over_seeds(records(plan.kind)), **made_columns(*records(plan.kind))}
            for plan in evaluated_plans(runs[0].attack)]


def defence_seed_rows(runs):
    """One row per seed of defence training (its held-out measurements after training), then their mean and
    spread over the seeds."""
    records = [read_json(os.path.join(run.outputs.save_dir, DEFENCE_RECORD)) for run in runs]
    rows = [{'seed': run.training.seed, **record['held_out']['after'], 'minutes': record['minutes']}
            for run, record in zip(runs, records)]
    figures = [k for k in rows[0] if k != 'seed']
    values = {k: torch.tensor([row[k] for row in rows], dtype=torch.float64) for k in figures}
    rows += [{'seed': 'mean', **{k: v.mean().item() for k, v in values.items()}},
             {'seed': 'spread (std)', **{k: v.std().item() for k, v in values.items()}}]
    return [{**row, **made_columns(*(records if isinstance(row['seed'], str) else [record]))}
            for row, record in zip(rows, records + [None, None])]


def seeds_table(config, seeds, rows, records, defence):
    first = config.training.seed
    mode = 'train_defence' if defence else 'train'
    victim = f'{victim_name(config.victim)} ({victim_label(config.victim)})'
    title = (f'{mode} over seeds {first}-{first + seeds - 1}: {victim} '
             f'cut at {config.victim.split}, {config.data.image_size} px; every seed scored on the same held-out '
             f'images (--split_seed {config.data.split_seed}).\n\n{provenance_note(records)}.')
    if defence:
        lines = markdown_lines(' | '.join(rows[0]), [
            ' | '.join(v if isinstance(v, str) else '—' if v is None else f'{v:.4g}' for v in row.values())
            for row in rows])
    else:
        lines = markdown_lines(f'attack | {SEEDS_HEADER}', [f'{row["attack"]} | {seed_cells(row)}' for row in rows])
    notes = [utility_note(config, Derived())] + ([] if defence else [BASELINE_NOTE])
    return '\n'.join([title, '', *lines, '', '. '.join(notes) + '.', ''])
