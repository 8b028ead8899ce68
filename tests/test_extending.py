"""docs/extending.md's example, run as written: its defence pasted into a copy of the tool works end to end."""
import json
import pathlib
import re
import shutil
import subprocess
import sys

from conftest import ROOT, THREADS

DOC = pathlib.Path(ROOT) / 'docs' / 'extending.md'
ANCHOR = 'KEEP_CHANNELS = KeepChannels()\n'
REGISTRY = re.compile(r'DEFENCES = \{d\.name: d for d in \(.*?\)\}\n', re.S)

CHECK = '''
import contextlib, io, pathlib, torch
from conftest import tiny_config
from recon_attack import cli as main
from recon_attack.attacks import build_attack
from recon_attack.data import load_splits
from recon_attack.defences import check_flags
from recon_attack.models.cuts import cut_at
from recon_attack.records import with_flags
from recon_attack.utils import UsageError
cfg = tiny_config(pathlib.Path('.'), defence='quantise', quantise_bits=2)
cut = cut_at(cfg.victim, cfg.data.image_size)
check_flags(cfg.defence, cut)
splits = load_splits(cfg.data)
attack, _ = build_attack(cfg, torch.device('cpu'), splits.calibration_images(16))
sent = attack.send(attack.to_images(splits.images[:8]))
levels = [row.unique().numel() for row in sent.flatten(1)]
clean = attack.encode(attack.to_images(splits.images[:8]))
assert max(levels) <= 4 and min(levels) >= 2 and not torch.equal(sent, clean), levels
try:
    check_flags(with_flags(cfg, quantise_bits=0).defence, cut)
except UsageError as e:
    print('refused:', e)
main.main(['--train', '--defence', 'quantise', '--quantise_bits', '2', '--image_size', '32', '--batch_size', '16',
           '--num_batches', '6', '--num_epochs', '1', '--decoder_depth', 'light', '--num_samples', '2',
           '--num_workers', '0', '--save_dir', 'run'])
main.main(['--report', 'run', '--save_dir', 'report'])
with contextlib.redirect_stdout(io.StringIO()) as help_text, contextlib.suppress(SystemExit):
    main.main(['--help'])
print('help:', ' '.join(help_text.getvalue().split()))
'''


def python_blocks(text):
    return re.findall(r'```python\n(.*?)```', text, re.S)


def test_the_documented_defence_runs_end_to_end(tmp_path):
    new_class, registry, _ = python_blocks(DOC.read_text())
    copy = tmp_path / 'tool'
    shutil.copytree(pathlib.Path(ROOT), copy, ignore=shutil.ignore_patterns('.git', 'runs', 'results', '__pycache__'))
    defences = copy / 'recon_attack' / 'defences.py'
    source = defences.read_text()
    assert source.count(ANCHOR) == 1 and len(REGISTRY.findall(source)) == 1, 'docs/extending.md names what is gone'
    source = source.replace(ANCHOR, new_class + '\n\n' + ANCHOR)
    defences.write_text(REGISTRY.sub(registry.replace('\\', '\\\\'), source))

    env = {'RECON_CACHE_DIR': str(tmp_path / 'cache'), 'OMP_NUM_THREADS': str(THREADS), 'PATH': '/usr/bin:/bin',
           'PYTHONPATH': f'{copy}:{copy / "tests"}'}
    checked = subprocess.run([sys.executable, '-c', CHECK], cwd=copy, env=env, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert 'refused: argument --quantise_bits: between 1 and 16 bits, got 0' in checked.stdout
    evaluation = json.loads((copy / 'run' / 'eval.json').read_text())
    assert evaluation['config']['defence'] == 'quantise' and evaluation['metrics']['kl']['mean'] > 0  # charged
    assert evaluation['provenance']['commit'] == 'unknown (not a git checkout)'  # a copy without .git says so
    assert 'quantised to 2 bits' in (copy / 'report' / 'report.md').read_text()  # tables name it
    assert 'quantise: round each sample to 2^--quantise_bits levels' in checked.stdout  # --help lists it


def test_the_documented_sweep_axis_is_one_entry(tmp_path, monkeypatch):
    """docs/extending.md's sweep over the learning rate: its entry of sweep.AXES alone makes a sweep that trains
    each value and tabulates it."""
    from dataclasses import replace
    import torch
    from conftest import tiny_config
    from recon_attack import sweep
    entry = python_blocks(DOC.read_text())[2]
    axes = eval('{' + entry + '}', {'Axis': sweep.Axis, 'numbers': sweep.numbers, 'replace': replace})
    monkeypatch.setattr(sweep, 'AXES', {**sweep.AXES, **axes})
    config = tiny_config(tmp_path, num_epochs=1, num_batches=6)
    rows = sweep.run_sweep(config, 'lr', ['1e-3', '1e-4'], 1, torch.device('cpu'))
    assert [row['lr'] for row in rows] == ['0.001', '0.0001']
    records = [json.loads((tmp_path / 'run' / f'lr={value}' / 'eval.json').read_text())['config']
               for value in ('0.001', '0.0001')]
    assert [r['lr'] for r in records] == [1e-3, 1e-4] and rows[0]['psnr'] != rows[1]['psnr']
    assert '| lr | tensor | channels sent |' in (tmp_path / 'run' / 'sweep.md').read_text()
