"""One table and figure across finished runs and sweeps (--report): the settings that differ between them, the
attack's quality and the victim's utility, and which runs were scored on the same held-out images."""
import glob
import json
import os
import string

from .attacks import ATTACKS
from .bound import CEILING_NOTE
from .config import AttackPlan
from .defences import describe as describe_defences, family
from .evaluate import evaluation_file
from .metrics import msssim_note
from .records import NOT_SETTINGS, flags_of, from_record, to_record
from .tables import (BASELINE_NOTE, RESULT_HEADER, SEEDS_HEADER, against_first, flagged_line, holm_note, made_columns,
                     markdown_lines, over_seeds, provenance_note, result_cells, result_columns, seed_cells,
                     tensor_columns)
from .utils import UsageError, atomic_write_bytes, read_json, save_csv
from .visualize import plot_privacy_utility

EVALUATIONS = {evaluation_file(kind): kind for kind in ATTACKS}  # file -> the attack it scored
# Named above the table when every run shares them.
SUMMARY_KEYS = ('arch', 'split', 'pretrained', 'weights', 'defence', 'data_dir', 'image_size', 'decoder',
                'interpolation', 'decoder_depth', 'num_epochs', 'batch_size', 'seed')


def find_evaluations(patterns):
    """(folder, file name) of every eval{_attack}.json in or below the given folders (or globs), in the order
    given, each once."""
    found, seen = [], set()
    for pattern in patterns:
        folders = sorted(glob.glob(os.path.expanduser(pattern)))
        if not folders:
            raise UsageError(f'--report {pattern}: no such folder')
        for folder in folders:
            if not os.path.isdir(folder):
                raise UsageError(f'--report {folder}: not a folder (give the folder of a run or a sweep)')
            inside = [(root, name) for root, dirs, files in sorted(os.walk(folder)) for name in sorted(files)
                      if name in EVALUATIONS]
            if not inside:
                raise UsageError(f'--report {folder}: no finished run in it (no eval.json or eval_*.json in it or below)')
            for root, name in inside:
                path = os.path.realpath(os.path.join(root, name))
                if path not in seen:
                    seen.add(path)
                    found.append((root, name))
    return found


def run_settings(result, kind, idle_flags):
    """What the run computed with: its configuration (flags newer than the run at their defaults), those that
    made no difference to it (`idle_flags(config, derived)`, and the optimisation's for the decoder alone) as None,
    the attack this evaluation scored, and the defences named as every output names them; and the run's
    (config.Config, config.Derived)."""
    config, derived = from_record(result['config'])
    idle = idle_flags(config, derived) | (set(flags_of(AttackPlan)) if kind == 'decoder' else set())
    noise = derived.noise(config.noise)
    defences = describe_defences(config.defence, noise, derived.victim_defence)
    return {**{k: None if k in idle else v for k, v in to_record(config, derived).items() if k not in NOT_SETTINGS},
            'attack': kind, 'defence': '; '.join(defences) or 'none'}, (config, derived)


def setting_text(key, value):
    if value is None:
        return 'built-in photos' if key == 'data_dir' else '—'
    if isinstance(value, bool):
        return 'yes' if value else 'no'
    if isinstance(value, float):
        return f'{value:g}'
    if isinstance(value, list):
        return ' '.join(map(str, value))
    return str(value)


def differing(settings):
    """The settings whose values are not the same in every run, in the order the flags are defined."""
    keys = list(dict.fromkeys(k for s in settings for k in s))
    return [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]


def held_out_sets(results):
    """A letter (a number after Z) per distinct set of scored images, by their content fingerprint; '?' where
    the evaluation was written before fingerprints were recorded."""
    names = {}
    for result in results:
        if result.get('held_out') and result['held_out'] not in names:
            names[result['held_out']] = string.ascii_uppercase[len(names)] if len(names) < 26 else str(len(names) + 1)
    return [names.get(result.get('held_out'), '?') for result in results]


def made_with_text(result):
    made = made_columns(result)
    return f'{made["precision"] or "arithmetic not recorded"} on {made["machine"] or "a machine not recorded"}'


def build_rows(evaluations, idle_flags):
    results = [read_json(os.path.join(folder, name)) for folder, name in evaluations]
    for (folder, name), result in zip(evaluations, results):
        if result is None or 'config' not in result or 'metrics' not in result:
            raise UsageError(f'--report: {os.path.join(folder, name)} is not an evaluation written by recon-attack')
    settings, runs = zip(*(run_settings(result, EVALUATIONS[name], idle_flags)
                           for (_, name), result in zip(evaluations, results)))
    columns = ['attack'] + [k for k in differing(settings) if k != 'attack']
    made_with = [made_with_text(result) for result in results]
    if len(set(made_with)) > 1:  # other arithmetic or another machine: other numbers, so another setting
        columns.append('made with')
    rows = []
    for i, ((folder, name), result, setting, (config, derived), images) in enumerate(
            zip(evaluations, results, settings, runs, held_out_sets(results)), start=1):
        rows.append({'#': i, 'run': folder, **{k: setting_text(k, setting.get(k)) for k in columns},
                     'family': family(config.defence, derived.noise(config.noise), derived.victim_defence),
                     **tensor_columns(config, derived), **result_columns(result), 'held_out_set': images,
                     **made_columns(result), 'made with': made_with[i - 1]})
    return rows, columns, settings, [config for config, _ in runs], results


SELECTION_RULE = ('where one run was evaluated more than once on the same images (its re-evaluations in eval_model/ '
                  'or eval_ckpt_N/), its final evaluation: of the longest-trained decoder, then the latest made')


def comparable(row):
    """What two rows must share for their PSNRs to be compared: the images scored, the arithmetic and the machine."""
    return row['held_out_set'], row['precision'], row['machine']


def final_evaluations(rows, results, columns):
    """One (row, result) per setting and seed, chosen by SELECTION_RULE, and a warning naming the rows left out."""
    chosen, left_out = {}, []
    for row, result in zip(rows, results):
        key = tuple(row[k] for k in columns) + comparable(row)
        if key in chosen:
            kept = max(chosen[key], (row, result), key=lambda pair: (pair[0]['epochs'] or 0, pair[0]['made'] or ''))
            left_out.append(next(r for r, _ in (chosen[key], (row, result)) if r is not kept[0]))
            chosen[key] = kept
        else:
            chosen[key] = (row, result)
    numbers = ', '.join(str(r['#']) for r in sorted(left_out, key=lambda r: r['#']))
    rows_are = ('rows', 'repeat', 'are') if len(left_out) > 1 else ('row', 'repeats', 'is')
    warning = (f'WARNING: {rows_are[0]} {numbers} {rows_are[1]} the setting and seed of another row and {rows_are[2]} '
               'left out of the table over seeds, which counts each seed once (' + SELECTION_RULE + ')'
               ) if left_out else None
    return list(chosen.values()), warning


def over_seed_groups(rows, columns, results):
    """The settings that were run at several seeds: rows that differ only in --seed (the same attack, held-out images,
    arithmetic and machine), each seed once (`final_evaluations`), each group as one row of means and spread over its
    seeds, compared with the first group that is `comparable` (never across sets: other images, other PSNRs).
    Returns (the groups, the comparisons tested, the warning about rows left out or None)."""
    chosen, warning = final_evaluations(rows, results, columns)
    groups = {}
    for row, result in chosen:
        key = tuple(row[k] for k in columns if k != 'seed') + comparable(row)
        groups.setdefault(key, []).append((row, result))
    if 'seed' not in columns or all(len(group) == 1 for group in groups.values()):
        return [], 0, warning
    grouped = [{'rows': ' '.join(str(row['#']) for row, _ in group),
                **{k: group[0][0][k] for k in columns if k != 'seed'}, 'held_out_set': group[0][0]['held_out_set'],
                **made_columns(*(result for _, result in group)), **over_seeds([result for _, result in group])}
               for group in groups.values()]
    tested = against_first(grouped, comparable, lambda group: f'— (rows {group["rows"]})')
    return grouped, tested, warning


def seeds_section(grouped, columns, tested):
    shown = [k for k in columns if k != 'seed']
    header = (f'rows | {" | ".join(shown)} | {SEEDS_HEADER} | PSNR against the first setting of its held-out set | '
              'held-out set')
    return ['', 'Over seeds: the rows that differ only in `seed` (the attacker\'s), as one setting each (one '
            'evaluation per seed: ' + SELECTION_RULE + '): the mean over its seeds and their spread; a difference from '
            'the first comparable setting (the same held-out images, arithmetic and machine) counts only where its '
            f'paired test over the seeds finds one ({holm_note(tested)}).', ''] + markdown_lines(header, [
                f'{g["rows"]} | {" | ".join(g[k] for k in shown)} | {seed_cells(g)} | {g["against_first"]} | '
                f'{g["held_out_set"]}' for g in grouped])


def comparable_sets(sets):
    """The one held-out set every row was scored on, or None where rows were scored on different images or where
    any row does not record its images ('?')."""
    return sets[0] if len(sets) == 1 and sets[0] != '?' else None


def held_out_warning(rows, sets):
    unknown = (" ('?': written before evaluations recorded their images' fingerprint, so no one can tell which "
               "images they scored; evaluate them again to place them)") if '?' in sets else ''
    if sets == ['?']:
        return f'WARNING: no row records which held-out images it was scored on{unknown}; do not compare them'
    return ('WARNING: these rows were not scored on the same held-out images (' + '; '.join(
        f'set {s}: rows {", ".join(str(r["#"]) for r in rows if r["held_out_set"] == s)}' for s in sets)
        + f'); compare rows only within a set{unknown}')


def markdown_report(rows, columns, settings, configs, patterns, sets, results, seeds=((), 0, None)):
    shared = [k for k in SUMMARY_KEYS if k not in columns and k in settings[0]
              and (settings[0][k] is not None or k == 'data_dir')]
    lines = [f'Report of {len(rows)} evaluations from {", ".join(patterns)}.', '', provenance_note(results) + '.', '',
             'Same in every run: ' + ', '.join(f'{k} {setting_text(k, settings[0][k])}' for k in shared) + '.', '',
             *markdown_lines(f'# | run | {" | ".join(columns)} | tensor | {RESULT_HEADER} | held-out set', [
                 f'{r["#"]} | {r["run"]} | {" | ".join(r[k] for k in columns)} | {r["tensor"]} | {result_cells(r)} | '
                 f'{r["held_out_set"]}' for r in rows])]
    grouped, tested, duplicates = seeds
    notes = [held_out_warning(rows, sets)] if comparable_sets(sets) is None else []
    notes += [duplicates] if duplicates else []
    notes += [BASELINE_NOTE] + sorted({msssim_note(c.data.image_size) for c in configs}) + [CEILING_NOTE]
    if all(r['lpips'] is None for r in rows):
        notes.append('LPIPS not scored: its AlexNet weights were not in the torch hub cache')
    if any(c.victim.random for c in configs):
        notes.append('rows with a random-initialised victim: their agreement figures are not meaningful')
    return '\n'.join(lines + (seeds_section(grouped, columns, tested) if grouped else [])
                     + ['', '. '.join(notes) + '.', ''])


def write_report(patterns, save_dir, idle_flags):
    """report.csv, report.md and report.png in `save_dir` for every evaluation under `patterns`; `idle_flags(config,
    derived)`: the flags that made no difference to a run. Returns the rows."""
    rows, columns, settings, configs, results = build_rows(find_evaluations(patterns), idle_flags)
    os.makedirs(save_dir, exist_ok=True)
    save_csv(rows, os.path.join(save_dir, 'report.csv'))
    seeds = over_seed_groups(rows, columns, results)
    if seeds[0]:
        save_csv(seeds[0], os.path.join(save_dir, 'report_seeds.csv'))
    sets = sorted({r['held_out_set'] for r in rows})
    table = markdown_report(rows, columns, settings, configs, patterns, sets, results, seeds)
    atomic_write_bytes(os.path.join(save_dir, 'report.md'), table.encode())
    one_set = comparable_sets(sets) is not None
    labels = [f'{r["#"]}' + ('' if one_set else f' ({r["held_out_set"]})') for r in rows]
    title = f'report of {len(rows)} evaluations (points: the rows of report.md' + (
        ')' if one_set else f'; held-out set in brackets: NOT COMPARABLE across sets {", ".join(sets)})')
    plot_privacy_utility(rows, labels, title + flagged_line(rows, labels), os.path.join(save_dir, 'report.png'))
    print(table)
    return rows
