"""The victim (a frozen classifier cut in two: cuts, victims) and the attacker's decoder (decoders)."""
from .cuts import ARCHS, DEFAULT_SPLIT, SPLITS, Cut, check_cut, cut, cut_at, nominal_stride, probe_feature_shape
from .decoders import (DECODER_DEPTHS, DECODERS, INTERPOLATIONS, NORMS, RESIDUAL_DEPTHS, Decoder, ResidualDecoder,
                       build_decoder, resolve)
from .victims import (DEFENDED_FORMAT, IMAGENET_MEAN, IMAGENET_STD, SplitVictim, build_victim, feature_shape,
                      load_network, victim_label)

__all__ = ['ARCHS', 'DEFAULT_SPLIT', 'SPLITS', 'Cut', 'check_cut', 'cut', 'cut_at', 'nominal_stride',
           'probe_feature_shape', 'DECODER_DEPTHS', 'DECODERS', 'INTERPOLATIONS', 'NORMS', 'RESIDUAL_DEPTHS', 'Decoder',
           'ResidualDecoder', 'build_decoder', 'resolve', 'DEFENDED_FORMAT', 'IMAGENET_MEAN', 'IMAGENET_STD',
           'SplitVictim', 'build_victim', 'feature_shape', 'load_network', 'victim_label']
