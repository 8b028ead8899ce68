"""A configuration as flags: what the command line gives, and what checkpoints, eval jsons and tables record.

On disk a run's configuration is one flat mapping of flag names to values (format 4 of checkpoints, eval.json,
metrics.json): the flags the run was given with what it derived applied, so that each record shows what acted (the
noise calibrated to a bound, the epochs a time budget allowed, a defended victim's training) and carries its derived
facts under their own keys. `to_record` writes one from a config.Config and its config.Derived; `from_record` reads
any format back into the pair. Flags and values renamed since a file was written are read under their new names."""
import dataclasses

from . import defences
from .config import Config, Derived, DefenceConfig
from .models.decoders import resolve

# What a run derives and records itself (never a flag): config.Derived's fields.
DERIVED_KEYS = tuple(f.name for f in dataclasses.fields(Derived) if f.name not in ('num_epochs', 'defended_with'))
# Settings of how a run is carried out, not of what it computes, and what it derived: compared by neither a sweep's
# resume nor a report.
NOT_SETTINGS = frozenset({'save_dir', 'overwrite', 'num_samples', 'num_workers', 'cache_dir', 'device',
                          'feature_cache_gb', 'log_interval', 'compile', 'deterministic', 'tensorboard',
                          'mode', 'model_path', 'eval_split', 'sweep', 'sweep_values', 'seeds', *DERIVED_KEYS})
# Settings added by format 3 and the values that reproduce what a format-2 checkpoint's run did.
FORMAT_2_SETTINGS = {'decoder': 'original', 'decoder_width': None, 'decoder_blocks': None, 'decoder_norm': 'none',
                     'feature_weight': 0.0, 'loss': 'mse', 'augment': False, 'ema': 0.0, 'warmup_epochs': 0.0,
                     'minutes': None}
# Renamed flags (config keys), old -> new: the old flag still works with a notice, and checkpoints, eval jsons and
# presets written with the old name still load.
RENAMED_FLAGS = {'aug': 'train_noise', 'defend': 'train_defence', 'eval_pth': 'eval', 'eval_ckpt': 'eval'}
# Renamed values of a flag, old -> new, read the same way.
RENAMED_VALUES = {'interpolation': {'upsample': 'bicubic'}}


def renamed_value(key, value):
    return RENAMED_VALUES.get(key, {}).get(value, value) if isinstance(value, str) else value


def current_names(flags):
    """A record's flags as this version names them: one written under a renamed flag or value, or before
    --split_seed and --victim_seed (checkpoint formats 2 and 3, their eval jsons: --seed seeded the split and the
    random victim too), read as it was meant."""
    current = {}
    for key, value in flags.items():
        key = RENAMED_FLAGS.get(key, key)
        if key == 'eval':  # --eval_pth and --eval_ckpt were one mode: either one switched on is --eval
            current[key] = value or current.get(key, False)
        else:
            current[key] = renamed_value(key, value)
    if 'mode' in current:
        current['mode'] = RENAMED_FLAGS.get(current['mode'], current['mode'])
    return {'split_seed': flags.get('seed', 0), 'victim_seed': flags.get('seed', 0), **current}


def flag_of(field):
    return field.metadata.get('flag', field.name)


def flags_of(cls):
    """The flags of a part of the configuration (a config dataclass), in the order of its fields."""
    return tuple(flag_of(f) for f in dataclasses.fields(cls))


def part_from_flags(cls, flags):
    """A part of the configuration from the flags that name its fields (the others at their defaults)."""
    values = {f.name: flags[flag_of(f)] for f in dataclasses.fields(cls) if flag_of(f) in flags}
    if cls is DefenceConfig:
        values['strengths'] = defences.strengths(flags)
    return cls(**values)


def from_flags(flags):
    """The config.Config the flags describe (flags it does not hold at their defaults)."""
    parts = {part.name: part_from_flags(part.type, flags) for part in dataclasses.fields(Config)}
    parts['decoder'] = resolve(parts['decoder'])
    return Config(**parts)


def to_flags(config):
    """The flags of a config.Config: the inverse of from_flags."""
    flags = {}
    for part in dataclasses.fields(Config):
        value = getattr(config, part.name)
        for field in dataclasses.fields(value):
            if field.name == 'strengths':
                flags.update(value.strengths)
            else:
                flags[flag_of(field)] = getattr(value, field.name)
    return flags


def with_flags(config, **flags):
    """`config` with some of its flags set otherwise (a sweep's value, a defence's settings)."""
    current = to_flags(config)
    unknown = set(flags) - set(current)
    if unknown:
        raise KeyError(f'not flags of the configuration: {", ".join(sorted(unknown))}')
    return from_flags({**current, **flags})


def to_record(config, derived=Derived()):
    """The flat record of a run: its flags with what it derived applied, and the derived facts themselves."""
    record = to_flags(dataclasses.replace(config, noise=derived.noise(config.noise)))
    record.update(derived.defended_with or {})
    record['num_epochs'] = derived.epochs(config.training)
    record.update({key: getattr(derived, key) for key in DERIVED_KEYS})
    if derived.sent_shape is not None:
        record['sent_shape'] = list(derived.sent_shape)
    return record


def from_record(record):
    """(config.Config, config.Derived) of a record written by to_record (or by an older version, any format)."""
    record = current_names(record)
    derived = Derived(**{key: record.get(key) for key in DERIVED_KEYS})
    if derived.sent_shape is not None:
        derived = dataclasses.replace(derived, sent_shape=tuple(derived.sent_shape))
    return from_flags(record), derived


# Flags that act only when another flag has a value: (flag, value) -> they.
DEPENDENT_FLAGS = {('scheduler', 'cosine'): ('warmup_epochs',), ('scheduler', 'step'): ('step_size', 'gamma'),
                   ('train_noise', True): ('noise_mean', 'noise_var'),
                   ('test_noise', True): ('test_noise_mean', 'test_noise_var'),
                   ('sparse', True): ('sparse_reg',)}


def idle_flags(config, derived=Derived()):
    """The flags that made no difference to a run: those its other flags leave without effect (so that a table of
    runs shows only settings that acted)."""
    flags = to_record(config, derived)
    dependent = {k for (flag, value), keys in DEPENDENT_FLAGS.items() if flags.get(flag) != value for k in keys}
    unused = defences.idle_flags(config.defence, derived.noise(config.noise), derived.victim_defence)
    return dependent | unused | (set() if config.training.stop_patience else {'stop_delta'})
