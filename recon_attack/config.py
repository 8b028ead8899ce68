"""The configuration of a run: one frozen, typed record built once at the command-line edge (cli.py) or by a caller of
the Python API, made of a small dataclass per concern. Each module receives only the parts it needs.

What a run finds out as it goes (the shape of the sent tensor, the channels a defence keeps, the victim's fingerprint,
noise calibrated to a bound, the epochs that fit a time budget) is not configuration: it is returned as a `Derived`
record and saved beside it (records.py), never written into it. A field's flag is its name unless its metadata says
otherwise (`flag`); records.py reads and writes a configuration as those flags."""
from dataclasses import dataclass, field, replace
from typing import NamedTuple


def flag(name, default=None, **kwargs):
    """A field whose command-line flag (and key in checkpoints and eval jsons) is `name`."""
    return field(default=default, metadata={'flag': name}, **kwargs)


class Noise(NamedTuple):
    """Gaussian noise the device adds, on the input image or on the intercepted tensor."""
    at: str  # 'input' | 'features'
    mean: float
    var: float  # variance, as the flags say, not the standard deviation


@dataclass(frozen=True)
class VictimConfig:
    """The frozen classifier and where it is cut: a torchvision classifier (`arch`), or a network of your own (`model`:
    'path/to/file.py:function' or 'package.module:function', a function returning the nn.Module), cut at `split` (a
    node or module of its traced graph, or a name this tool gave a cut before)."""
    arch: str = 'resnet18'
    split: str = 'layer2'
    pretrained: bool = False  # torchvision's ImageNet weights
    weights: str = None  # a state-dict file (or a defended victim's file) instead
    seed: int = flag('victim_seed', 0)  # a random-initialised victim's weights
    reference: str = None  # the original victim a defended --weights file is charged against
    model: str = flag('victim', None)  # your own network's entry point, instead of `arch`
    normalize: str = 'imagenet'  # what the network expects of [0, 1] images: imagenet | none | MEAN,STD

    @property
    def random(self):
        """A victim random-initialised from its seed: its predictions mean nothing, so neither does its agreement."""
        return not self.pretrained and not self.weights


@dataclass(frozen=True)
class DataConfig:
    """The images, how they are split into training and held-out images, and the batches they come in."""
    data_dir: str = None  # None: the built-in sample photos
    image_size: int = 64
    batch_size: int = 32
    num_batches: int = None  # None: all the images
    split_seed: int = 0
    cache_dir: str = None  # where decoded images are cached (None: $RECON_CACHE_DIR or ~/.cache/recon-attack)
    num_workers: int = 2


@dataclass(frozen=True)
class NoiseConfig:
    """Gaussian noise: on the image before the victim or on the tensor it sends (a defence), while the attacker
    trains and when it is measured; or on the tensor at the variance of an unbiased-attacker ceiling, or at a
    signal-to-noise ratio to the tensor's centred power."""
    at: str = flag('noise_at', 'input')
    train: bool = flag('train_noise', False)
    mean: float = flag('noise_mean', 0.0)
    var: float = flag('noise_var', 0.01)
    test: bool = flag('test_noise', False)
    test_mean: float = flag('test_noise_mean', 0.0)
    test_var: float = flag('test_noise_var', 0.01)
    for_bound: float = flag('noise_for_bound', None)  # dB: the ceiling the noise is calibrated to
    quantile: float = flag('bound_quantile', None)  # None: the mean ceiling; q: the ceiling a share q stay below
    snr: float = flag('noise_snr', None)  # dB: noise on the tensor this far below its centred power
    probes: int = flag('fil_probes', 16)  # of the bound's estimate
    prior_sigma: float = 0.1  # the smoothing of the prior-aware bound's prior

    def training(self):
        return Noise(self.at, self.mean, self.var) if self.train else None

    def testing(self):
        return Noise(self.at, self.test_mean, self.test_var) if self.test else None


@dataclass(frozen=True)
class DecoderSpec:
    """The attacker's decoder (models.decoders builds it); `interpolation`, `width` and `blocks` None take the
    defaults of `kind` and `depth` (models.decoders.resolve)."""
    kind: str = flag('decoder', 'original')  # 'original' (the original work's, unchanged) | 'residual' (this tool's)
    interpolation: str = None  # how each x2 stage upsamples
    depth: str = flag('decoder_depth', 'medium')  # capacity preset
    width: int = flag('decoder_width', None)  # residual: channels where the tensor arrives
    blocks: int = flag('decoder_blocks', None)  # residual: residual blocks at that resolution
    norm: str = flag('decoder_norm', 'batch')  # residual: normalisation after each conv

    def label(self):
        """Its name in tables and figure titles."""
        if self.kind == 'original':
            return f'original {self.interpolation} decoder ({self.depth})'
        return f'residual {self.interpolation} decoder (width {self.width}, {self.blocks} blocks, {self.norm} norm)'


@dataclass(frozen=True)
class DefenceConfig:
    """What the device does to the tensor it sends (fixed defences), or the defence a victim is trained into.
    `strengths` holds each defence's own flag (--defence_p, --nopeek_weight...): defences.DEFENCES says which."""
    defence: str = 'none'  # the fixed defence on the sent tensor (--defence)
    keep_channels: float = None  # a fraction in (0, 1] or a count of the channels sent
    channel_select: str = 'topvar'
    train_defence: str = None  # the defence a victim is trained into
    strengths: dict = field(default_factory=dict)  # read only
    epochs: int = flag('defend_epochs', 10)
    lr: float = flag('defend_lr', 1e-4)
    server: bool = flag('defend_server', False)  # fine-tune the server's half too


@dataclass(frozen=True)
class AttackPlan:
    """How the attacker turns the sent tensor into an image when it is evaluated."""
    kind: str = flag('attack', 'decoder')  # 'decoder' | 'optimize' | 'decoder+optimize'
    steps: int = flag('attack_steps', 500)  # of the white-box optimisation
    lr: float = flag('attack_lr', 0.2)
    tv_weight: float = 0.3


@dataclass(frozen=True)
class TrainConfig:
    """How the attacker's decoder is trained."""
    optim: str = 'adam'
    lr: float = 1e-3
    weight_decay: float = 0.0
    scheduler: str = 'none'  # 'none' | 'cosine' | 'step'
    warmup_epochs: float = 0.25
    step_size: int = 10
    gamma: float = 0.1
    loss: str = 'mse'
    augment: bool = False
    ema: float = 0.0
    num_epochs: int = 10
    stop_patience: int = 0  # 0: no stopping rule
    stop_delta: float = 0.05
    minutes: float = None  # a time budget instead of num_epochs
    sparse: bool = False
    sparse_reg: float = 1e-4
    feature_weight: float = 0.0  # the white-box feature-consistency term
    seed: int = 0  # the attacker's
    feature_cache_gb: float = 4.0
    log_interval: int = 5  # epochs between checkpoints


@dataclass(frozen=True)
class Runtime:
    """How a run is carried out, not what it computes."""
    device: str = 'auto'
    precision: str = 'bf16'
    compile: bool = False
    deterministic: bool = False


@dataclass(frozen=True)
class Outputs:
    save_dir: str = 'results'
    overwrite: bool = False
    tensorboard: bool = False
    num_samples: int = 8


@dataclass(frozen=True)
class Config:
    victim: VictimConfig = VictimConfig()
    data: DataConfig = DataConfig()
    noise: NoiseConfig = NoiseConfig()
    decoder: DecoderSpec = DecoderSpec()
    defence: DefenceConfig = DefenceConfig()
    training: TrainConfig = TrainConfig()
    attack: AttackPlan = AttackPlan()
    runtime: Runtime = Runtime()
    outputs: Outputs = Outputs()


@dataclass(frozen=True)
class Derived:
    """What a run found out about itself (returned, recorded beside its configuration, never written into it)."""
    sent_shape: tuple = None  # (C, H, W) of the tensor the device sends
    channel_indices: list = None  # the channels --keep_channels chose
    victim_fingerprint: float = None  # of the encoder's weights, to catch another victim later
    victim_defence: str = None  # a defended victim's name in outputs (a --train_defence file, or --reference)
    defended_with: dict = None  # the flags a --train_defence file was trained with, shown as the run's own
    victim_digest: str = None  # sha256 of the file a --victim network was built from
    bound_calibration: dict = None  # --noise_for_bound: the variance found and how
    snr_calibration: dict = None  # --noise_snr: the tensor's centred power and the variance it gives
    num_epochs: int = None  # --minutes: the epochs that fit

    def noise(self, noise):
        """The noise of the run: the configured one, or the one calibrated to a bound or to the tensor's power (on
        the tensor, in training and measurement alike)."""
        calibration = self.bound_calibration or self.snr_calibration
        if calibration is None:
            return noise
        variance = calibration['variance']
        return replace(noise, at='features', train=True, mean=0.0, var=variance, test=True, test_mean=0.0,
                       test_var=variance)

    def epochs(self, training):
        """The epochs the run trains for: those --minutes found, else --num_epochs."""
        return self.num_epochs or training.num_epochs
