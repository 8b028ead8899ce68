"""Held out means held out: evaluation scores only images the decoder never trained on, as the checkpoint
recorded them, whatever the spelling of the path, files added, changed or copied elsewhere, or CelebA's partition."""
import csv
import os
import shutil

import pytest
import torch

from conftest import write_photos
from recon_attack.checkpoint import load_checkpoint

TRAIN = ('--train', '--image_size', '32', '--batch_size', '8', '--num_epochs', '1', '--decoder_depth', 'light',
         '--num_samples', '2', '--num_workers', '0', '--save_dir', 'run')


@pytest.fixture
def run(tmp_path, main_here):
    """main.py in tmp_path: what it printed, or (exit code, stderr) when it failed."""
    def run_main(*args):
        result = main_here(tmp_path, *args)
        return (result.returncode, result.stderr) if result.returncode else result.stdout
    return run_main


def scored(folder):
    with open(folder / 'eval_per_image.csv') as f:
        return {row['image'] for row in csv.DictReader(f)}


def recorded(path):
    return load_checkpoint(str(path))['data']


def test_evaluation_scores_the_recorded_held_out_images_whatever_the_path_spelling(tmp_path, run):
    write_photos(tmp_path / 'data', [f'p{i:02d}.png' for i in range(34)])
    run(*TRAIN, '--data_dir', 'data')
    record = recorded(tmp_path / 'run' / 'model.pth')
    assert len(record['train']) == 31 and len(record['held_out']) == 3
    assert not set(record['train']) & set(record['held_out'])
    for i, spelling in enumerate(('data', './data', 'data/', str(tmp_path / 'data'))):
        out = run('--eval', '--model_path', 'run/model.pth', '--data_dir', spelling, '--save_dir', f'eval{i}')
        assert scored(tmp_path / f'eval{i}') == set(record['held_out']), spelling
        assert '3 images held out at training' in out


def test_files_added_changed_or_removed_after_training_never_make_training_images_held_out(tmp_path, run):
    write_photos(tmp_path / 'data', [f'p{i:02d}.png' for i in range(34)])
    run(*TRAIN, '--data_dir', 'data', '--log_interval', '1')
    record = recorded(tmp_path / 'run' / 'model.pth')
    write_photos(tmp_path / 'data', ['a_new_one.png', 'another.png', 'zz_third.png'], seed=1)  # shifts the listing
    run('--eval', '--model_path', 'run/model.pth', '--save_dir', 'added')
    assert scored(tmp_path / 'added') == set(record['held_out'])

    changed, gone, kept = sorted(record['held_out'])
    write_photos(tmp_path / 'data', [changed], seed=2)
    os.remove(tmp_path / 'data' / gone)
    out = run('--eval', '--model_path', 'run/model.pth', '--save_dir', 'damaged')
    assert 'of the 3 images held out at training, 1 are gone and 1 changed: scoring the 1 unchanged ones' in out
    assert scored(tmp_path / 'damaged') == {kept}

    code, error = run('--resume', '--model_path', 'run/ckpt_1.ckpt', '--num_epochs', '2')
    assert code == 2 and 'gone or changed' in error and 'start a new --train' in error


def test_another_folder_is_scored_without_the_images_trained_on(tmp_path, run):
    write_photos(tmp_path / 'data', [f'p{i:02d}.png' for i in range(34)])
    run(*TRAIN, '--data_dir', 'data')
    record = recorded(tmp_path / 'run' / 'model.pth')
    copies = sorted(record['train'])[:3]
    (tmp_path / 'other').mkdir()
    for i, name in enumerate(copies):  # the same content under other names
        shutil.copy(tmp_path / 'data' / name, tmp_path / 'other' / f'copy{i}.png')
    write_photos(tmp_path / 'other', ['fresh0.png', 'fresh1.png'], seed=3)
    out = run('--eval', '--model_path', 'run/model.pth', '--data_dir', 'other', '--save_dir', 'other_eval')
    assert '3 of the 5 images are images the decoder trained on (the same content): left out of the score' in out
    assert scored(tmp_path / 'other_eval') == {'fresh0.png', 'fresh1.png'}
    code, error = run('--eval', '--model_path', 'run/model.pth', '--data_dir', 'data', '--eval_split', 'test',
                      '--save_dir', 'no_test')
    assert code == 2 and 'has no list_eval_partition.txt' in error


def test_celeba_uses_its_official_partition_and_evaluates_val_or_test(tmp_path, run):
    names = [f'{i:06d}.jpg' for i in range(1, 41)]
    write_photos(tmp_path / 'celeba' / 'img_align_celeba', names)
    partition = ['0'] * 28 + ['1'] * 6 + ['2'] * 6
    (tmp_path / 'celeba' / 'list_eval_partition.txt').write_text(
        ''.join(f'{n} {p}\n' for n, p in zip(names, partition)))
    out = run(*TRAIN, '--data_dir', 'celeba')
    assert "CelebA's official train / val partition" in out
    record = recorded(tmp_path / 'run' / 'model.pth')
    assert set(record['train']) == set(names[:28]) and set(record['held_out']) == set(names[28:34])
    run('--eval', '--model_path', 'run/model.pth', '--save_dir', 'val')
    assert scored(tmp_path / 'val') == set(names[28:34])
    out = run('--eval', '--model_path', 'run/model.pth', '--eval_split', 'test', '--save_dir', 'test')
    assert scored(tmp_path / 'test') == set(names[34:])
    assert "6 images of CelebA's official test partition" in out


def test_a_checkpoint_that_does_not_record_its_images_is_refused(tmp_path, run):
    torch.save({'config': {}, 'decoder': {}}, tmp_path / 'old.pth')
    code, error = run('--eval', '--model_path', 'old.pth')
    assert code == 2 and 'did not record which images it trained on' in error
