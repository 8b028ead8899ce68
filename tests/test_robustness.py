"""Bad input gets one clear line, interrupted runs lose nothing and resume exactly, untrusted files are refused."""
import argparse
import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import interrupt_training, run_cli, write_photos
from recon_attack import cli, train as train_module
from recon_attack.checkpoint import load_checkpoint
from recon_attack.data import load_images
from recon_attack.utils import atomic_write_bytes

TINY = ('--image_size', '32', '--batch_size', '16', '--num_batches', '22', '--decoder_depth', 'light',
        '--num_samples', '2', '--num_workers', '0')


def one_line_error(result, code=2):
    assert result.returncode == code, result.stdout + result.stderr
    assert 'Traceback' not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:') or ': error:' in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture
def cli_error(tmp_path, main_here):
    """main.py's error for these flags, run in this process (fast); checks exit 2 and a single line."""
    return lambda *args: one_line_error(main_here(tmp_path, *args))


def write_ok_photos(folder, count):
    write_photos(folder, [f'ok_{i:02d}.png' for i in range(count)], size=(56, 48))


def write_messy_files(folder):
    """The kinds of file a real dataset holds, good and bad; returns the names that must be skipped."""
    good = folder / 'ok_00.png'
    (folder / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0' + os.urandom(500))
    (folder / 'truncated.png').write_bytes(good.read_bytes()[:200])
    (folder / 'notes.png').write_text('not an image at all')
    Image.new('RGB', (1, 1)).save(folder / 'one_pixel.png')
    deep = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40)
    Image.fromarray(deep).save(folder / 'sixteen_bit.png')
    Image.new('CMYK', (40, 40), (0, 128, 255, 0)).save(folder / 'cmyk.jpg')
    return {'corrupt.jpg', 'truncated.png', 'notes.png', 'one_pixel.png'}


def test_messy_dataset_skips_the_unusable_files_once_and_keeps_the_rest(tmp_path, capsys):
    write_ok_photos(tmp_path / 'data', 3)
    skipped = write_messy_files(tmp_path / 'data')
    data = load_images(str(tmp_path / 'data'), 32, str(tmp_path / 'cache'), 0)
    images, names = data.images, data.names
    assert set(names) == {'ok_00.png', 'ok_01.png', 'ok_02.png', 'sixteen_bit.png', 'cmyk.jpg'}
    assert not skipped & set(names)
    report = capsys.readouterr().out
    assert 'skipped 4 unreadable or too small image file(s), e.g.' in report
    sixteen = images[names.index('sixteen_bit.png')]
    assert sixteen.max() > 200 and sixteen.min() < 10  # scaled to 8 bits, not clipped to white
    load_images(str(tmp_path / 'data'), 32, str(tmp_path / 'cache'), 0)  # the second time from the cache: no report
    assert 'skipped' not in capsys.readouterr().out


def test_training_goes_on_over_a_messy_dataset(tmp_path):
    write_ok_photos(tmp_path / 'data', 34)
    write_messy_files(tmp_path / 'data')
    result = run_cli(tmp_path, '--train', '--data_dir', 'data', '--image_size', '32', '--batch_size', '8',
                     '--num_epochs', '1', '--decoder_depth', 'light', '--num_samples', '2', '--num_workers', '0',
                     '--save_dir', 'run')
    assert 'skipped 4 unreadable' in result.stdout
    assert (tmp_path / 'run' / 'model.pth').is_file()


@pytest.mark.parametrize('make, args, message', [
    (None, ('--data_dir', 'nowhere'), '--data_dir nowhere: no such file or folder'),
    ('file', ('--data_dir', 'plain.txt'), 'neither a folder nor a .zip archive'),
    ('empty', ('--data_dir', 'empty'), 'no images found'),
    ('no_images', ('--data_dir', 'texts'), 'no images found'),
    ('fake_zip', ('--data_dir', 'fake.zip'), 'not a valid zip archive'),
    ('only_bad', ('--data_dir', 'bad'), 'none of the 2 image files could be decoded'),
])
def test_bad_data_dir_is_one_line_with_exit_2(tmp_path, cli_error, make, args, message):
    if make == 'file':
        (tmp_path / 'plain.txt').write_text('hello')
    elif make == 'empty':
        (tmp_path / 'empty').mkdir()
    elif make == 'no_images':
        (tmp_path / 'texts').mkdir()
        (tmp_path / 'texts' / 'a.txt').write_text('hello')
    elif make == 'fake_zip':
        (tmp_path / 'fake.zip').write_bytes(b'PK\x03\x04 but not really')
    elif make == 'only_bad':
        (tmp_path / 'bad').mkdir()
        (tmp_path / 'bad' / 'a.jpg').write_bytes(b'junk')
        (tmp_path / 'bad' / 'b.png').write_bytes(b'junk')
    assert message in cli_error('--train', *TINY, *args)


def test_model_path_that_is_not_a_checkpoint_or_unsafe(tmp_path, cli_error):
    (tmp_path / 'random.pth').write_bytes(os.urandom(1000))
    assert 'random.pth: not a checkpoint' in cli_error('--eval', '--model_path', 'random.pth')
    torch.save({'some': 'dict'}, tmp_path / 'state_dict.pth')
    assert 'not a recon-attack checkpoint' in cli_error('--eval', '--model_path', 'state_dict.pth')
    torch.save({'config': {}, 'decoder': {}, 'args': argparse.Namespace(lr=1)}, tmp_path / 'pickled.pth')
    line = cli_error('--eval', '--model_path', 'pickled.pth')
    assert 'refused as unsafe' in line and 'argparse.Namespace' in line


@pytest.mark.parametrize('args, message', [
    (('--noise_var', '-0.1'), '--noise_var: must not be negative'),
    (('--split', 'layer2.0.conv1'), 'not cut in two at layer2.0.conv1 (the server\'s half would need an earlier tensor'),
    (('--keep_channels', '0'), '--keep_channels: must be positive'),
    (('--keep_channels', '2.5'), 'a fraction in (0, 1] or a whole number of channels'),
])
def test_impossible_flags_are_caught_at_parse_time(cli_error, args, message):
    assert message in cli_error('--train', *TINY, *args)


def test_out_of_memory_names_the_batch_size_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    real_epoch = train_module.train_one_epoch

    def out_of_memory_in_epoch_two(*args, **kwargs):
        if args[5] == 1:
            raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
        return real_epoch(*args, **kwargs)
    monkeypatch.setattr(train_module, 'train_one_epoch', out_of_memory_in_epoch_two)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(['--train', *TINY, '--num_epochs', '3', '--log_interval', '1', '--save_dir', 'run',
                  '--cache_dir', str(tmp_path / 'cache')])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert 'ran out of memory at --batch_size 16: try --batch_size 8' in error and 'Traceback' not in error
    assert load_checkpoint(str(tmp_path / 'run' / 'ckpt_1.ckpt'), need_optimizer=True)['epoch'] == 1


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path):
    result = run_cli(tmp_path, '--train', *TINY, '--num_epochs', '3', '--log_interval', '1', '--scheduler', 'step',
                     '--step_size', '1', '--gamma', '1e40', '--save_dir', 'run', check=False)
    assert 'the training loss became nan in epoch 2' in one_line_error(result, code=1)
    assert load_checkpoint(str(tmp_path / 'run' / 'ckpt_1.ckpt'), need_optimizer=True)['epoch'] == 1
    assert not (tmp_path / 'run' / 'ckpt_2.ckpt').exists()
    with open(tmp_path / 'run' / 'metrics.json') as f:
        assert len(json.load(f)['history']) == 1


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / 'model.pth'
    atomic_write_bytes(str(path), b'the good checkpoint')

    def crash(fd):
        raise OSError('disk full')
    monkeypatch.setattr(os, 'fsync', crash)
    with pytest.raises(OSError):
        atomic_write_bytes(str(path), b'half of a new one')
    assert path.read_bytes() == b'the good checkpoint'
    assert os.listdir(tmp_path) == ['model.pth']  # no temporary file left behind


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_and_resume_matches_an_uninterrupted_run(tmp_path, signum):
    args = ('--image_size', '32', '--batch_size', '16', '--num_batches', '44', '--num_epochs', '2',
            '--decoder_depth', 'light', '--num_samples', '2', '--num_workers', '0', '--log_interval', '1',
            '--augment', '--ema', '0.9', '--scheduler', 'cosine')  # per-batch schedule, crops, average: exactly
    code, out, err = interrupt_training(tmp_path, signum, 'epoch 2/2', *args, '--save_dir', 'cut')
    assert code == 130, out + err
    assert 'training stopped in epoch 2 after step' in err
    assert 'to go on: python main.py --resume --model_path cut/interrupted.ckpt' in err
    state = load_checkpoint(str(tmp_path / 'cut' / 'interrupted.ckpt'), need_optimizer=True)
    assert state['epoch'] == 1 and 0 < state['partial_epoch']['step'] < state['partial_epoch']['of']
    if signum == signal.SIGTERM:
        return
    run_cli(tmp_path, '--resume', '--model_path', 'cut/interrupted.ckpt')
    run_cli(tmp_path, '--train', *args, '--save_dir', 'whole')
    with open(tmp_path / 'cut' / 'metrics.json') as f:
        resumed = json.load(f)['history']
    with open(tmp_path / 'whole' / 'metrics.json') as f:
        whole = json.load(f)['history']
    for key in ('train_loss', 'val_loss', 'psnr', 'ssim', 'ms_ssim'):
        assert [h[key] for h in resumed] == pytest.approx([h[key] for h in whole], rel=1e-6), key
