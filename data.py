"""Images in, uint8 tensors out: a folder, a .zip or a CelebA root, decoded once into a cache; or built-in photos."""
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from utils import UsageError, atomic_write_bytes, progress

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
MIN_SOURCE_SIDE = 8  # smaller images (1-pixel thumbnails and the like) hold nothing to reconstruct

# Built-in sample data: photographs shipped inside scikit-image and matplotlib, so no download is needed.
SAMPLE_TRAIN_PHOTOS = ('coffee.png', 'chelsea.png', 'rocket.jpg', 'hubble_deep_field.jpg', 'retina.jpg', 'ihc.png',
                       'motorcycle_left.png', 'motorcycle_right.png')
SAMPLE_VAL_PHOTOS = ('astronaut.png', 'grace_hopper.jpg')  # portraits, never used for training
SAMPLE_SIZE = 704  # images (crops) in the built-in set: 640 train + 64 validation at the default batch size


@dataclass
class Splits:
    images: torch.Tensor  # uint8 (N, 3, S, S), possibly memory-mapped
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    names: list
    description: str

    @property
    def val_names(self):
        return [self.names[i] for i in self.val_idx]


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
                    return i, None
                return i, square_crop(image, self.size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, zipfile.BadZipFile):
            return i, None


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
    """All images decoded once into a memory-mapped uint8 file, reused across epochs and runs.

    Unusable files are found here, once, and reported; the training loop never sees them."""
    key = cache_key(root, names, size)
    array_path, index_path = os.path.join(cache_dir, f'{key}.u8'), os.path.join(cache_dir, f'{key}.json')
    kept = read_cache_index(index_path, array_path, size)
    if kept is None:
        write_cache(root, names, size, array_path, index_path, num_workers)
        kept = read_cache_index(index_path, array_path, size)
    images = np.memmap(array_path, dtype=np.uint8, mode='c',  # copy-on-write: never changes the file
                        shape=(len(kept), 3, size, size))
    if images.nbytes < available_memory() // 4:  # in memory when it fits, else paged in from the file
        images = np.array(images)
    return torch.from_numpy(images), kept


def available_memory():
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):  # not Linux: let the page cache decide
        return 0


def read_cache_index(index_path, array_path, size):
    """The names held by a complete cache; None when it is missing or does not match its file (then rebuilt)."""
    try:
        with open(index_path) as f:
            kept = json.load(f)['names']
        complete = os.path.getsize(array_path) == len(kept) * 3 * size * size
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return kept if complete else None


def write_cache(root, names, size, array_path, index_path, num_workers):
    os.makedirs(os.path.dirname(array_path), exist_ok=True)
    tmp_path = f'{array_path}.{os.getpid()}.tmp'
    images = np.memmap(tmp_path, dtype=np.uint8, mode='w+', shape=(len(names), 3, size, size))
    loader = DataLoader(DecodeOnce(root, names, size), batch_size=64, num_workers=num_workers, collate_fn=as_list)
    kept, bad = [], []
    for batch in progress(loader, desc=f'decoding {len(names)} images at {size}px (once, cached)'):
        for i, image in batch:  # in file order: usable images are packed to the front
            if image is None:
                bad.append(names[i])
            else:
                images[len(kept)] = image.numpy()
                kept.append(names[i])
    images.flush()
    del images
    if bad:
        print(f'skipped {len(bad)} unreadable or too small image file(s), e.g. {", ".join(bad[:3])}')
    if not kept:
        os.remove(tmp_path)
        raise UsageError(f'--data_dir {root}: none of the {len(names)} image files could be decoded')
    os.truncate(tmp_path, len(kept) * 3 * size * size)
    os.replace(tmp_path, array_path)
    atomic_write_bytes(index_path, json.dumps({'root': os.path.abspath(root), 'size': size, 'names': kept}).encode())


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


def builtin_splits(image_size, batch_size, num_batches, seed):
    n_train, n_val = split_counts(SAMPLE_SIZE, batch_size, num_batches)
    generator = torch.Generator().manual_seed(seed)
    train = random_crops([sample_photo(n) for n in SAMPLE_TRAIN_PHOTOS], n_train, image_size, generator)
    val = random_crops([sample_photo(n) for n in SAMPLE_VAL_PHOTOS], n_val, image_size, generator)
    names = [f'{os.path.splitext(photos[i % len(photos)])[0]}_crop{i:03d}'
             for photos, count in ((SAMPLE_TRAIN_PHOTOS, n_train), (SAMPLE_VAL_PHOTOS, n_val)) for i in range(count)]
    return Splits(torch.cat([train, val]), torch.arange(n_train), torch.arange(n_train, n_train + n_val), names,
                  f'built-in sample photos ({n_train} train crops, {n_val} validation crops '
                                     f'of {" and ".join(SAMPLE_VAL_PHOTOS)})')


def load_images(data_dir, image_size, cache_dir, num_workers):
    """(uint8 images, names) for every usable image under `data_dir`."""
    root, names = list_images(data_dir)
    return decode_into_cache(root, names, image_size, cache_dir, num_workers)


def load_splits(cfg):
    """The train / validation images a run uses, as described by its configuration."""
    if cfg['data_dir'] is None:
        return builtin_splits(cfg['image_size'], cfg['batch_size'], cfg['num_batches'], cfg['seed'])
    images, names = load_images(cfg['data_dir'], cfg['image_size'], cfg['cache_dir'], cfg['num_workers'])
    train_idx, val_idx = split_indices(len(images), cfg['batch_size'], cfg['num_batches'], cfg['seed'])
    return Splits(images, train_idx, val_idx, names,
                  f'{cfg["data_dir"]} ({len(train_idx)} train, {len(val_idx)} validation of {len(images)} images)')
