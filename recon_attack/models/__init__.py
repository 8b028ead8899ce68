"""The victim (a frozen classifier cut in two: cuts, victims; the layout of what it sends: layouts) and the
attacker's decoder (decoders)."""
from .cuts import (ALIASES, DEFAULT_SPLIT, SPLITS, Cut, check_cut, cut, cut_at, default_split, list_splits,
                   probe_feature_shape)
from .decoders import (DECODER_DEPTHS, DECODERS, INTERPOLATIONS, NORMS, RESIDUAL_DEPTHS, Decoder, ResidualDecoder,
                       build_decoder, resolve)
from .layouts import Layout, layout_of
from .victims import (DEFENDED_FORMAT, IMAGENET_MEAN, IMAGENET_STD, SplitVictim, build_victim, feature_shape,
                      load_network, victim_label)

__all__ = ['ALIASES', 'DEFAULT_SPLIT', 'SPLITS', 'Cut', 'check_cut', 'cut', 'cut_at', 'default_split', 'list_splits',
           'probe_feature_shape', 'DECODER_DEPTHS', 'DECODERS', 'INTERPOLATIONS', 'NORMS', 'RESIDUAL_DEPTHS',
           'Decoder', 'ResidualDecoder', 'build_decoder', 'resolve', 'Layout', 'layout_of', 'DEFENDED_FORMAT',
           'IMAGENET_MEAN', 'IMAGENET_STD', 'SplitVictim', 'build_victim', 'feature_shape', 'load_network',
           'victim_label']
