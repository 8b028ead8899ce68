"""The README and docs/ agree with the flags, and --help reads as a newcomer needs it."""
import contextlib
import io
import pathlib
import re

import pytest
import torch

import bench
from conftest import ROOT
from recon_attack import cli
from recon_attack.utils import UsageError

DOCS = [pathlib.Path(ROOT) / 'README.md', *sorted((pathlib.Path(ROOT) / 'docs').glob('*.md'))]
FLAG = re.compile(r'(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]')
OTHER_TOOLS = {'--nproc_per_node', '--logdir'}  # torchrun's and tensorboard's, named in docs/


def help_text(entry):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        entry(['--help'])
    return out.getvalue()


def test_every_flag_the_readme_and_docs_name_exists():
    extending = (pathlib.Path(ROOT) / 'docs' / 'extending.md').read_text()
    example = ''.join(re.findall(r'```python\n(.*?)```', extending, re.S))  # the flag of its example defence
    known = set(FLAG.findall(help_text(cli.main) + help_text(bench.main) + example)) | OTHER_TOOLS
    unknown = {f'{doc.name}: {flag}' for doc in DOCS for flag in FLAG.findall(doc.read_text()) if flag not in known}
    assert not unknown, sorted(unknown)


def heading_anchors(markdown):
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r'[^\w -]', '', title.strip().lower()).replace(' ', '-')
            for title in re.findall(r'^#+ (.*)$', markdown, re.M)}


def test_every_doc_the_readme_links_exists():
    readme = DOCS[0].read_text()
    links = re.findall(r'\]\(((?:docs/)?[\w./-]+\.(?:md|png|cff)|LICENSE)(?:#([\w-]+))?\)', readme)
    assert len(links) >= 8 and all((pathlib.Path(ROOT) / link).exists() for link, _ in links), links
    for link, anchor in links:
        if anchor:
            assert anchor in heading_anchors((pathlib.Path(ROOT) / link).read_text()), (link, anchor)


def test_help_prints_each_default_once_and_lists_the_cuts():
    for entry in (cli.main, bench.main):
        text = ' '.join(help_text(entry).split())
        assert '(default: None)' not in text and '(default: False)' not in text, entry
        assert not re.search(r'default[^()]*\) \(default:', text), entry  # never twice
        assert '(default: 0.0)' in text or entry is bench.main  # a default of zero is a default too
    text = help_text(cli.main)
    assert 'mobilenet_v2: block3 block6 block10 block13 block16 (default block6)' in ' '.join(text.split())
    assert '--train_defence' in text.split('trained defences')[0]  # among the modes
    assert 'examples:' in text


def test_no_flag_prints_a_short_usage_and_where_to_start(capsys):
    cli.main([])
    out = capsys.readouterr().out
    assert len(out.splitlines()) <= 4 and 'start with:' in out and 'python main.py --help' in out


def test_the_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/api.md's example: the device's and the server's halves, an attacker trained on one set of images, and
    its evaluation on others, beside the baselines and the bound."""
    [example] = re.findall(r'```python\n(.*?)```', (pathlib.Path(ROOT) / 'docs' / 'api.md').read_text(), re.S)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(example, 'docs/api.md', 'exec'), scope)
    assert scope['sent'].shape == (4, 64, 8, 8) and scope['logits'].shape == (4, 1000)
    assert len(scope['trained'].history) == 2 and (tmp_path / 'runs' / 'api' / 'model.pth').is_file()
    result, others = scope['result'], scope['others']
    assert len(result.per_image['psnr']) == len(others) and 'psnr_ceiling' in result.per_image
    assert result.summary['psnr']['mean'] > result.baselines['untrained_decoder']['psnr']['mean']
    assert result.bound['noise'] == {'at': 'features', 'variance': 0.1}
    assert f"decoder {result.summary['psnr']['mean']:.2f} dB" in capsys.readouterr().out


def test_the_api_leaves_out_images_the_decoder_trained_on(tmp_path, monkeypatch):
    from recon_attack import evaluate_attack, train_attacker, DecoderSpec, TrainConfig
    from recon_attack.data import builtin_splits
    photos = builtin_splits(image_size=32, batch_size=16, num_batches=22, seed=0)
    images = photos.images[photos.train_idx]
    trained = train_attacker(images, decoder=DecoderSpec(depth='light'), training=TrainConfig(num_epochs=1),
                             batch_size=16, save_dir=str(tmp_path / 'run'))
    held_out = images[trained.splits.val_idx]
    mixed = torch.cat([images[trained.splits.train_idx[:3]], held_out])
    assert len(evaluate_attack(trained, mixed).per_image['psnr']) == len(held_out)
    with pytest.raises(UsageError, match='every one of them is an image the decoder trained on'):
        evaluate_attack(trained, images[trained.splits.train_idx[:4]])


def test_the_package_installs_what_requirements_txt_lists_and_its_command_is_main():
    """pyproject.toml: the dependencies of requirements.txt (pytest as the test extra), the presets as package data,
    and a `recon-attack` console script that is main.py's entry point."""
    import importlib
    import tomllib
    project = tomllib.loads((pathlib.Path(ROOT) / 'pyproject.toml').read_text())
    required = [line.strip() for line in (pathlib.Path(ROOT) / 'requirements.txt').read_text().splitlines()
                if line.strip() and not line.startswith('#')]
    declared = project['project']['dependencies'] + project['project']['optional-dependencies']['test']
    assert sorted(declared) == sorted(required)
    module, function = project['project']['scripts']['recon-attack'].split(':')
    assert getattr(importlib.import_module(module), function) is cli.main
    assert project['tool']['setuptools']['package-data']['recon_attack'] == ['presets/*.args']
    shipped = sorted(p.stem for p in (pathlib.Path(ROOT) / 'recon_attack' / 'presets').glob('*.args'))
    assert shipped and cli.presets() == shipped
