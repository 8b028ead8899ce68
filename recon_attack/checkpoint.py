"""Checkpoints (model.pth, ckpt_N.ckpt, interrupted.ckpt): the decoder's weights with the run's record (its
configuration and what it derived, records.py), the images it trained on and held out, and its history; read with
weights_only=True, and in every format this tool wrote."""
import dataclasses
import os
import re

import torch

from .attacks import build_attack
from .data import BUILTIN_SOURCE, held_out_images, load_splits
from .evaluate import mean_training_image
from .records import FORMAT_2_SETTINGS, current_names, from_record
from .utils import UsageError

# 2: the images trained on and held out are recorded; 3: --decoder and recipe; 4: --split_seed and --victim_seed
CHECKPOINT_FORMAT = 'recon-attack/4'


def load_checkpoint(path, need_optimizer=False):
    """A recon-attack checkpoint, loaded with weights_only=True: files from others are untrusted. Its 'config' is
    the record of its run under the current names of its flags (records.from_record reads it)."""
    if not os.path.isfile(path):
        raise UsageError(f'--model_path {path}: no such file')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        unsafe = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
        if unsafe:  # a pickle that names Python objects to build: it could run anything
            raise UsageError(f'--model_path {path}: refused as unsafe: it asks to build the Python object '
                             f'{unsafe.group(1)}, and loading it could run code from the file; weights_only=True '
                             f'accepts only tensors and plain data') from None
        raise UsageError(f'--model_path {path}: not a checkpoint (not written by torch.save, or damaged)') from None
    if not isinstance(state, dict) or not {'config', 'decoder'} <= set(state):
        raise UsageError(f'--model_path {path}: not a recon-attack checkpoint (no config and decoder inside)')
    if 'data' not in state:
        raise UsageError(f'--model_path {path}: written by an older recon-attack that did not record which images it '
                         f'trained on, so none can be scored as held out; train it again')
    if state.get('format') == 'recon-attack/2':
        state['config'] = {**FORMAT_2_SETTINGS, **state['config']}
    state['config'] = current_names(state['config'])
    if need_optimizer and 'optimizer' not in state:
        raise UsageError(f'--model_path {path}: holds no optimizer state (a model.pth); resume from a ckpt_N.ckpt')
    return state


def checkpoint_epochs(state):
    """A checkpoint's training, as the logs name it: its epoch, and the epoch of its weights where the stopping rule
    chose an earlier epoch's."""
    if state.get('weights_epoch'):
        return (f'{state["epoch"]} epochs, the weights of epoch {state["weights_epoch"]}, the best on the stopping '
                'images')
    return f'epoch {state["epoch"]}'


def load_trained_attack(state, device, config=None, derived=None, path='the checkpoint'):
    """The attack a checkpoint's decoder belongs to, its weights loaded: built from the checkpoint's own record, or
    from `config` and `derived` (config.Config and config.Derived: the record with this command's settings of how
    to run, and the attack to evaluate)."""
    if config is None:
        config, derived = from_record(state['config'])
    attack, _ = build_attack(config, device, derived=derived)
    try:
        attack.decoder.load_state_dict(state['decoder'])
    except RuntimeError as e:
        raise UsageError(f'--model_path {path}: decoder weights do not fit its configuration '
                         f'({str(e).splitlines()[0]})') from None
    return attack


def mean_image(state, data):
    """The mean of the images a checkpoint's decoder trained on (the baseline of its evaluations): recorded in it, or
    for a checkpoint from before it was, computed from its recorded training images (training_splits); None, said
    in one line, where they cannot be read."""
    if 'mean_image' in state:
        return state['mean_image']
    splits = training_splits(state, data, 'mean-image baseline')
    return None if splits is None else mean_training_image(splits)


def training_splits(state, data, needed_by):
    """The Splits a checkpoint's decoder trained on, from the recorded training images of `data` (a
    config.DataConfig, its data_dir where the run trained) where they are still there; None, said in one line
    naming what `needed_by` them is left out, where they are not."""
    source = None if state['data']['source'] == BUILTIN_SOURCE else state['data']['source']
    try:
        return load_splits(dataclasses.replace(data, data_dir=source), state['data'])
    except UsageError as e:
        print(f'{needed_by} left out: the images this decoder trained on cannot be read ({e})')
        return None


def evaluation_images(data, state, weights=None, split='val'):
    """The Scored images of `data` (a config.DataConfig) a checkpoint may be scored on: held out from its training
    (and from its defended victim's, `weights`)."""
    return held_out_images(data, state['data'], weights, split)
