"""Images in, uint8 tensors out: a folder, a .zip or a CelebA root, decoded once into a cache; or built-in photos."""
import functools
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .models.victims import defence_training_images
from .utils import RunError, UsageError, atomic_write_bytes, progress

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
MIN_SOURCE_SIDE = 8  # smaller images (1-pixel thumbnails and the like) hold nothing to reconstruct

# Built-in sample data: every photograph at least 256 px on its shorter side that scikit-image and matplotlib ship
# (drawings, renderings and the 25 px LFW thumbnails left out), so no download is needed.
SAMPLE_TRAIN_PHOTOS = ('coffee.png', 'chelsea.png', 'rocket.jpg', 'hubble_deep_field.jpg', 'retina.jpg', 'ihc.png',
                       'motorcycle_left.png', 'motorcycle_right.png', 'brick.png', 'cell.png', 'clock_motion.png',
                       'coins.png', 'grass.png', 'gravel.png', 'moon.png')
SAMPLE_VAL_PHOTOS = ('astronaut.png', 'grace_hopper.jpg', 'camera.png')  # portraits, never used for training
SAMPLE_SIZE = 704  # images (crops) in the built-in set: 640 train + 64 validation at the default batch size
BUILTIN_SOURCE = 'built-in sample photos'
GIVEN_SOURCE = 'images given in Python'  # the Python API's own images
CELEBA_PARTITION = 'list_eval_partition.txt'  # the official train / val / test split (identity-disjoint)
CELEBA_IDENTITIES = 'identity_CelebA.txt'  # each image's person: stopping images never share one with training
PARTITIONS = {'train': '0', 'val': '1', 'test': '2'}


class Scored(NamedTuple):
    """The images an evaluation scores, images[indices]: their names, what they are, and one fingerprint of their
    content (runs scored on the same images share it, whatever their names or order)."""
    images: torch.Tensor
    indices: torch.Tensor
    names: list
    description: str
    fingerprint: str


@dataclass
class Splits:
    images: torch.Tensor  # uint8 (N, 3, S, S), possibly memory-mapped
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    names: list  # relative to the data root
    fingerprints: list  # of each decoded image's pixels: the same content has the same fingerprint anywhere
    source: str  # the data root's real path, or BUILTIN_SOURCE
    description: str
    partition: dict = None  # name -> 'train' | 'val' | 'test' for a CelebA root with its official partition
    cache: str = None  # the decoded-image cache file `images` come from
    stop_idx: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # --stop_patience
    stop_origins: list = field(default_factory=list)  # the origins (photos, people) of stop_idx
    pixel_hashes: dict = field(default_factory=dict)  # index -> fingerprint of its pixels, hashed once when scored
    identities: dict = None  # name -> CelebA identity, where the root has its identity file

    @property
    def val_names(self):
        return [self.names[i] for i in self.val_idx]

    def scored(self, indices, description):
        """images[indices] as an evaluation scores them, fingerprinted from the pixels that will be scored; refused
        where those are not the pixels decoded from the files (a cache damaged in place)."""
        digest = hashlib.blake2b(digest_size=8)
        for i in indices.tolist():
            if i not in self.pixel_hashes:
                self.pixel_hashes[i] = fingerprint(self.images[i])
        hashes = [self.pixel_hashes[i] for i in indices.tolist()]
        for i, image_hash in zip(indices.tolist(), hashes):
            if image_hash != self.fingerprints[i]:
                raise RunError(f'the decoded-image cache {self.cache} is damaged: {self.names[i]} no longer holds the '
                               f'pixels decoded from its file; delete it (it is rebuilt from the images) and run again')
        for image_hash in sorted(hashes):
            digest.update(image_hash.encode())
        return Scored(self.images, indices, [self.names[i] for i in indices], description, digest.hexdigest())

    def validation(self):
        return self.scored(self.val_idx, f'validation split of {self.description}')

    def calibration_images(self, count):
        """Training images on which the device calibrates a defence (the channels --keep_channels keeps)."""
        return self.images[self.train_idx[:count]]

    def record(self):
        """Which images were trained on and which were held out, by name and content: stored in checkpoints."""
        return {'source': self.source, **{part: {self.names[i]: self.fingerprints[i] for i in indices.tolist()}
                                          for part, indices in self.parts().items()},
                **({'stop_origins': self.stop_origins} if self.stop_origins else {})}

    def parts(self):
        """The recorded parts: trained on, held out and scored, and (--stop_patience) held out to stop on."""
        stop = {'stop': self.stop_idx} if len(self.stop_idx) else {}
        return {'train': self.train_idx, 'held_out': self.val_idx, **stop}

    def origin(self, i):
        """What image i was made from, so that images of one origin stay on one side of a split: its CelebA
        identity where known, else its file's stem before '_crop' (crops of one photo), else its name."""
        name = self.names[i]
        if self.identities:
            identity = self.identities.get(name, self.identities.get(os.path.basename(name)))
            if identity is not None:
                return f'identity {identity}'
        stem = os.path.splitext(name)[0]
        return stem.split('_crop')[0] if '_crop' in stem else stem

    def set_stopping_images(self, seed):
        """--stop_patience: about as many images as are scored, whole origins (`origin`) drawn (seeded) out of the
        training images, to decide when training stops: held out from training and never reported, so no choice is
        made on the reported images, and no origin on both sides, so the rule does not watch near-training data."""
        origins = {}
        for i in self.train_idx.tolist():
            origins.setdefault(self.origin(i), []).append(i)
        target, most = min(len(self.val_idx), len(self.train_idx) // 2), len(self.train_idx) // 2
        groups, chosen = list(origins.values()), []
        for k in torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist():
            group = groups[k]
            if len(chosen) < target and len(chosen) + len(group) <= most:
                chosen += group
        if not chosen or len(chosen) == len(self.train_idx):
            raise UsageError(f'--stop_patience needs training images of at least two origins (photos, people) to '
                             f'hold some out, but the {len(self.train_idx)} training images come from '
                             f'{len(origins)}: leave --stop_patience off or add images')
        stop = set(chosen)
        self.stop_idx = torch.tensor(sorted(stop), dtype=torch.long)
        self.train_idx = torch.tensor([i for i in self.train_idx.tolist() if i not in stop], dtype=torch.long)
        self.stop_origins = sorted({self.origin(i) for i in chosen})
        self.description = (f'{self.description}; {len(chosen)} of its training images ({len(self.stop_origins)} '
                            f'of {len(origins)} photos or people) held out to stop on')


def fingerprint(image):
    """A content hash of one decoded uint8 image."""
    return hashlib.blake2b(image.numpy().tobytes(), digest_size=8).hexdigest()


def list_images(data_dir):
    """(source, names): `source` is a folder or a zip path; names are relative paths inside it, sorted."""
    if not os.path.exists(data_dir):
        raise UsageError(f'--data_dir {data_dir}: no such file or folder')
    if os.path.isdir(data_dir):
        celeba = os.path.join(data_dir, 'img_align_celeba')
        root = celeba if os.path.isdir(celeba) else data_dir
        names = sorted(os.path.relpath(os.path.join(folder, f), root)
                       for folder, _, files in os.walk(root) for f in files
                       if f.lower().endswith(IMAGE_EXTENSIONS))
    elif zipfile.is_zipfile(data_dir):
        with zipfile.ZipFile(data_dir) as z:
            root = data_dir
            names = sorted(n for n in z.namelist() if n.lower().endswith(IMAGE_EXTENSIONS)
                           and not os.path.basename(n).startswith('.'))
    elif data_dir.lower().endswith('.zip'):
        raise UsageError(f'--data_dir {data_dir}: not a valid zip archive (truncated or corrupt?); re-create it')
    else:
        raise UsageError(f'--data_dir {data_dir}: neither a folder nor a .zip archive of images')
    if not names:
        raise UsageError(f'--data_dir {data_dir}: no images found ({", ".join(IMAGE_EXTENSIONS)}, searched recursively)')
    return root, names


def to_rgb(image):
    """RGB for any PIL mode; 16-bit greyscale is scaled to 8 bits rather than clipped."""
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
        scale = 1 / 257 if image.mode.startswith('I;16') else 1 / 256 ** 3 * 255
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) * scale, 0, 255).astype(np.uint8))
    return image.convert('RGB')


def square_crop(image, size):
    """Shorter side resized to `size`, then the centre square: (3, size, size) uint8."""
    image = TF.resize(to_rgb(image), size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.pil_to_tensor(TF.center_crop(image, size))


class DecodeOnce(Dataset):
    """Decodes one file into a square uint8 tensor; None for a file that cannot be used."""

    def __init__(self, root, names, size):
        self.root, self.names, self.size = root, names, size
        self.zip = None

    def open(self, name):
        if os.path.isdir(self.root):
            return open(os.path.join(self.root, name), 'rb')
        if self.zip is None:  # one handle per worker process
            self.zip = zipfile.ZipFile(self.root)
        return self.zip.open(name)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        try:
            with self.open(self.names[i]) as f, Image.open(f) as image:
                image.load()
                if min(image.size) < MIN_SOURCE_SIDE:
                    return i, None, None
                crop = square_crop(image, self.size)
                return i, crop, fingerprint(crop)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, zipfile.BadZipFile):
            return i, None, None


def as_list(batch):
    return batch


def cache_key(root, names, size):
    """Changes when the files, their sizes or dates, or the image size change."""
    h = hashlib.sha1(f'{os.path.abspath(root)}|{size}'.encode())
    if os.path.isdir(root):
        for name in names:
            st = os.stat(os.path.join(root, name))
            h.update(f'{name}|{st.st_size}|{st.st_mtime_ns}\n'.encode())
    else:
        st = os.stat(root)
        h.update(f'{st.st_size}|{st.st_mtime_ns}|{len(names)}'.encode())
    return h.hexdigest()[:16]


def decode_into_cache(root, names, size, cache_dir, num_workers):
    """All images decoded once into a memory-mapped uint8 file, reused across epochs and runs; returns (images,
    names, fingerprints) of the usable ones and the file.

    Unusable files are found here, once, and reported; the training loop never sees them."""
    key = cache_key(root, names, size)
    array_path, index_path = os.path.join(cache_dir, f'{key}.u8'), os.path.join(cache_dir, f'{key}.json')
    index = read_cache_index(index_path, array_path, size)
    if index is None:
        write_cache(root, names, size, array_path, index_path, num_workers)
        index = read_cache_index(index_path, array_path, size)
    kept, fingerprints = index
    images = np.memmap(array_path, dtype=np.uint8, mode='c',  # copy-on-write: never changes the file
                        shape=(len(kept), 3, size, size))
    if images.nbytes < available_memory() // 4:  # in memory when it fits, else paged in from the file
        images = np.array(images)
    return torch.from_numpy(images), kept, fingerprints, array_path


def available_memory():
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):  # not Linux: let the page cache decide
        return 0


def read_cache_index(index_path, array_path, size):
    """(names, fingerprints) held by a complete cache; None when it is missing, older than fingerprints, or does not
    match its file (then it is rebuilt)."""
    try:
        with open(index_path) as f:
            index = json.load(f)
        kept, fingerprints = index['names'], index['fingerprints']
        complete = os.path.getsize(array_path) == len(kept) * 3 * size * size and len(fingerprints) == len(kept)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (kept, fingerprints) if complete else None


def write_cache(root, names, size, array_path, index_path, num_workers):
    os.makedirs(os.path.dirname(array_path), exist_ok=True)
    tmp_path = f'{array_path}.{os.getpid()}.tmp'
    images = np.memmap(tmp_path, dtype=np.uint8, mode='w+', shape=(len(names), 3, size, size))
    loader = DataLoader(DecodeOnce(root, names, size), batch_size=64, num_workers=num_workers, collate_fn=as_list)
    kept, fingerprints, bad = [], [], []
    for batch in progress(loader, desc=f'decoding {len(names)} images at {size}px (once, cached)'):
        for i, image, image_fingerprint in batch:  # in file order: usable images are packed to the front
            if image is None:
                bad.append(names[i])
            else:
                images[len(kept)] = image.numpy()
                kept.append(names[i])
                fingerprints.append(image_fingerprint)
    images.flush()
    del images
    if bad:
        print(f'skipped {len(bad)} unreadable or too small image file(s), e.g. {", ".join(bad[:3])}')
    if not kept:
        os.remove(tmp_path)
        raise UsageError(f'--data_dir {root}: none of the {len(names)} image files could be decoded')
    os.truncate(tmp_path, len(kept) * 3 * size * size)
    os.replace(tmp_path, array_path)
    atomic_write_bytes(index_path, json.dumps({'root': os.path.abspath(root), 'size': size, 'names': kept,
                                               'fingerprints': fingerprints}).encode())


def full_batches(n, batch_size):
    """Where each batch of an epoch starts: full batches only (for BatchNorm, and the statistics of a batch), or
    one short batch when there are fewer images than that."""
    return range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size)


def split_counts(n_total, batch_size, num_batches):
    """(n_train, n_val): 10:1 as in the original work (validation = num_batches // 11 batches)."""
    if num_batches is None:
        n_val = max(1, n_total // 11)
        return n_total - n_val, n_val
    needed = num_batches * batch_size
    if needed > n_total:
        raise UsageError(f'--num_batches {num_batches} x --batch_size {batch_size} = {needed} images, but the data '
                         f'holds {n_total}; use --num_batches {n_total // batch_size} or fewer')
    n_val = max(1, num_batches // 11) * batch_size
    return needed - n_val, n_val


def split_indices(n_total, batch_size, num_batches, seed):
    """Seeded, reproducible, disjoint train / validation indices."""
    n_train, n_val = split_counts(n_total, batch_size, num_batches)
    order = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return order[n_val:n_val + n_train], order[:n_val]


def read_partition(data_dir):
    """CelebA's official partition, name -> 'train' | 'val' | 'test', when the root holds its file; else None."""
    path = os.path.join(data_dir, CELEBA_PARTITION)
    if not os.path.isfile(path):
        return None
    labels = {code: name for name, code in PARTITIONS.items()}
    try:
        with open(path) as f:
            return {name: labels[code] for name, code in (line.split() for line in f if line.strip())}
    except (ValueError, KeyError):
        raise UsageError(f'{path}: not CelebA\'s partition file (lines of "NAME 0|1|2"); fix or remove it') from None


def read_identities(data_dir):
    """CelebA's identity of each image, name -> identity, when the root holds its file; else None."""
    path = os.path.join(data_dir, CELEBA_IDENTITIES)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return dict(line.split() for line in f if line.strip())
    except ValueError:
        raise UsageError(f'{path}: not CelebA\'s identity file (lines of "NAME IDENTITY"); fix or remove it') from None


def partition_indices(data, batch_size, num_batches, seed):
    """Training and validation images from CelebA's official train and val partitions (seeded subsets of them
    when --num_batches asks for fewer)."""
    pools = [torch.tensor([i for i, n in enumerate(data.names) if data.partition.get(n) == p], dtype=torch.long)
             for p in ('train', 'val')]
    n_train, n_val = ((len(pools[0]), len(pools[1])) if num_batches is None else
                      split_counts(sum(map(len, pools)), batch_size, num_batches))
    if n_train > len(pools[0]) or n_val > len(pools[1]) or not n_train or not n_val:
        raise UsageError(f'CelebA\'s official partition holds {len(pools[0])} training and {len(pools[1])} validation '
                         f'images of these, but the run needs {n_train} and {n_val}: lower --num_batches')
    generator = torch.Generator().manual_seed(seed)
    return tuple(pool[torch.randperm(len(pool), generator=generator)[:n]] for pool, n in zip(pools, (n_train, n_val)))


def sample_photo(filename):
    """A photo file shipped inside scikit-image (skimage/data) or matplotlib (mpl-data/sample_data)."""
    import matplotlib
    import skimage.data
    folders = (os.path.dirname(skimage.data.__file__), os.path.join(matplotlib.get_data_path(), 'sample_data'))
    path = next(os.path.join(d, filename) for d in folders if os.path.exists(os.path.join(d, filename)))
    with Image.open(path) as image:
        return image.convert('RGB')


def random_crops(photos, count, size, generator):
    """`count` seeded random square crops (30-100 % of the shorter side) of the photos, resized to `size`."""
    crops = torch.empty(count, 3, size, size, dtype=torch.uint8)
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = int(min(w, h) * (0.3 + 0.7 * torch.rand(1, generator=generator).item()))
        left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
        crops[i] = square_crop(photo.crop((left, top, left + side, top + side)), size)
    return crops


@functools.lru_cache(maxsize=4)
def builtin_crops(image_size, n_train, n_val, seed):
    """The built-in photos' crops: cut once a process (a sweep loads its data once a value); callers get a copy."""
    generator = torch.Generator().manual_seed(seed)
    train = random_crops([sample_photo(n) for n in SAMPLE_TRAIN_PHOTOS], n_train, image_size, generator)
    val = random_crops([sample_photo(n) for n in SAMPLE_VAL_PHOTOS], n_val, image_size, generator)
    return torch.cat([train, val])


def builtin_splits(image_size, batch_size, num_batches, seed):
    n_train, n_val = split_counts(SAMPLE_SIZE, batch_size, num_batches)
    images = builtin_crops(image_size, n_train, n_val, seed).clone()
    names = [f'{os.path.splitext(photos[i % len(photos)])[0]}_crop{i:03d}'
             for photos, count in ((SAMPLE_TRAIN_PHOTOS, n_train), (SAMPLE_VAL_PHOTOS, n_val)) for i in range(count)]
    return Splits(images, torch.arange(n_train), torch.arange(n_train, n_train + n_val), names,
                  [fingerprint(image) for image in images], BUILTIN_SOURCE,
                  f'built-in sample photos ({n_train} train crops, {n_val} validation crops '
                  f'of {", ".join(SAMPLE_VAL_PHOTOS)})')


def as_uint8(images):
    """(N, 3, S, S) images as this tool stores them: uint8, from uint8 or from floats in [0, 1] (rounded)."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise UsageError(f'images: a tensor of square RGB images (N, 3, S, S) is needed, got {tuple(images.shape)}')
    if images.dtype == torch.uint8:
        return images.cpu()
    if images.min() < 0 or images.max() > 1:
        raise UsageError('images: floats must lie in [0, 1] (or pass uint8 images, 0-255)')
    return (images.detach().float().cpu() * 255).round().to(torch.uint8)


def given_splits(images, batch_size, split_seed=0):
    """Splits of images given in Python (see as_uint8): a seeded 10:1 split into training and held-out images, as for
    a folder, held-out images never sharing a training image's content."""
    images = as_uint8(images)
    data = Splits(images, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                  [f'image{i:05d}' for i in range(len(images))], [fingerprint(image) for image in images], GIVEN_SOURCE,
                  GIVEN_SOURCE)
    train_idx, val_idx = split_indices(len(images), batch_size, None, split_seed)
    data.train_idx = train_idx
    data.val_idx = without_training_content(data, val_idx.tolist(), {data.fingerprints[i] for i in train_idx.tolist()},
                                            'held-out images')
    data.description = (f'{GIVEN_SOURCE} ({len(data.train_idx)} train, {len(data.val_idx)} held out, a seeded 10:1 '
                        'split)')
    return data


def load_images(data_dir, image_size, cache_dir, num_workers):
    """Every usable image under `data_dir`, as Splits with nothing assigned to training or validation yet."""
    root, names = list_images(data_dir)
    images, kept, fingerprints, cache = decode_into_cache(root, names, image_size, cache_dir, num_workers)
    partition, identities = (read_partition(data_dir), read_identities(data_dir)) if os.path.isdir(data_dir) else (
        None, None)
    empty = torch.zeros(0, dtype=torch.long)
    return Splits(images, empty, empty, kept, fingerprints, os.path.realpath(root), data_dir, partition, cache,
                  identities=identities)


def cache_folder(cache_dir):
    """Where decoded images are cached: `cache_dir`, else $RECON_CACHE_DIR, else ~/.cache/recon-attack."""
    return cache_dir or os.environ.get('RECON_CACHE_DIR', os.path.expanduser('~/.cache/recon-attack'))


def load_data(data):
    """The images a config.DataConfig names (the built-in set already split into its training and validation
    photos)."""
    if data.data_dir is None:
        return builtin_splits(data.image_size, data.batch_size, data.num_batches, data.split_seed)
    return load_images(data.data_dir, data.image_size, cache_folder(data.cache_dir), data.num_workers)


def without_training_content(data, candidates, trained_fingerprints, what, trainee='the decoder'):
    """`candidates` less any image whose content is one `trainee` trained on (a duplicate file too), said once."""
    kept = [i for i in candidates if data.fingerprints[i] not in trained_fingerprints]
    if len(kept) < len(candidates):
        print(f'{len(candidates) - len(kept)} of the {len(candidates)} {what} are images {trainee} trained on '
              f'(the same content): left out of the score')
    return torch.tensor(kept, dtype=torch.long)


def without_defence_training(data, candidates, weights, what):
    """`candidates` (indices) less the images a defended victim (the --weights file) was fine-tuned on: a defence is
    never scored on the images it trained on, by the attack or by its cost to the victim."""
    defended = set(defence_training_images(weights).values())
    if not defended:
        return candidates
    return without_training_content(data, candidates.tolist(), defended, what, 'the defence')


def load_splits(config, record=None, weights=None, stopping=False):
    """The train / validation images of a run (config: a config.DataConfig): those of `record` (a checkpoint's) when
    given, else split anew (CelebA's official partition where the root has one, else a seeded 10:1 split), never
    scoring an image the defended victim `weights` (a --weights file) was fine-tuned on; with `stopping`
    (--stop_patience), some training images held out to stop on."""
    data = load_data(config)
    if record is not None:
        return recorded_splits(data, record)
    if data.source == BUILTIN_SOURCE:
        data.val_idx = without_defence_training(data, data.val_idx, weights, 'validation images')
    else:
        split_anew(data, config, weights)
    if stopping:
        data.set_stopping_images(config.split_seed)
    return data


def split_anew(data, config, weights):
    """Train and validation images of a folder: CelebA's official partition where the root has one, else a seeded
    10:1 split; validation never holds a training image's content or a defended victim's training image."""
    if data.partition is not None:
        train_idx, val_idx = partition_indices(data, config.batch_size, config.num_batches, config.split_seed)
        how = "CelebA's official train / val partition"
    else:
        train_idx, val_idx = split_indices(len(data.images), config.batch_size, config.num_batches, config.split_seed)
        how = 'a seeded 10:1 split'
    data.train_idx = train_idx
    val_idx = without_training_content(data, val_idx.tolist(), {data.fingerprints[i] for i in train_idx.tolist()},
                                       'validation images')
    data.val_idx = without_defence_training(data, val_idx, weights, 'validation images')
    data.description = (f'{config.data_dir} ({len(data.train_idx)} train, {len(data.val_idx)} validation of '
                        f'{len(data.images)} images, {how})')


def recorded_splits(data, record):
    """The exact train / validation images a checkpoint recorded (to resume a run): all must be there unchanged."""
    where = {name: i for i, name in enumerate(data.names)}
    if data.source != record['source']:
        raise UsageError(f'--data_dir {data.description} is not the data this run was trained on '
                         f'({record["source"]}); resume with that --data_dir')
    indices = []
    for part in ('train', 'held_out', 'stop'):
        lost = [n for n, f in record.get(part, {}).items() if n not in where or data.fingerprints[where[n]] != f]
        if lost:
            raise UsageError(f'{len(lost)} of the images this run recorded ({part}) are gone or changed in '
                             f'{record["source"]} (e.g. {lost[0]}): it cannot go on as it was; start a new --train')
        indices.append(torch.tensor([where[n] for n in record.get(part, {})], dtype=torch.long))
    data.train_idx, data.val_idx, data.stop_idx = indices
    data.stop_origins = record.get('stop_origins', [])
    if data.source != BUILTIN_SOURCE:
        data.description = f'{data.description} ({len(indices[0])} train, {len(indices[1])} validation, as recorded)'
    return data


def held_out_images(config, record, weights=None, split='val'):
    """The Scored images of `config` (a config.DataConfig) an evaluation of a trained decoder may score; `record`:
    the images it trained on and held out (its checkpoint's), `weights`: its victim's file.

    Never an image it trained on (by content, whatever the folder or file name); on the training data itself,
    exactly the recorded held-out images that are still there unchanged (whatever spelling of the path), or
    CelebA's official test partition with --eval_split test."""
    data = load_data(config)
    trained = set(record['train'].values())
    where = 'the built-in photos' if data.source == BUILTIN_SOURCE else config.data_dir
    if split == 'test' and data.partition is None:
        raise UsageError(f'--eval_split test: {where} has no {CELEBA_PARTITION} (CelebA\'s official partition); '
                         f'evaluate with --eval_split val')
    if data.partition is not None and (split == 'test' or data.source != record['source']):
        candidates = [i for i, n in enumerate(data.names) if data.partition.get(n) == split]
        what = f"images of CelebA's official {split} partition"
    elif data.source == record['source']:
        recorded = record['held_out']
        present = [i for i, n in enumerate(data.names) if n in recorded]
        candidates = [i for i in present if data.fingerprints[i] == recorded[data.names[i]]]
        if len(candidates) < len(recorded):
            print(f'of the {len(recorded)} images held out at training, {len(recorded) - len(present)} are gone and '
                  f'{len(present) - len(candidates)} changed: scoring the {len(candidates)} unchanged ones')
        what = 'images held out at training'
    else:
        candidates, what = list(range(len(data.names))), 'images'
    scored = without_defence_training(data, without_training_content(data, candidates, trained, what), weights, what)
    if not len(scored):
        raise UsageError(f'{where}: no image left that the decoder did not train on; evaluate on other images')
    return data.scored(scored, f'{len(scored)} {what} of {where}')
