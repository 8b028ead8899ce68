import zipfile

import pytest
import torch
from PIL import Image

from conftest import write_photos
from recon_attack.data import SAMPLE_VAL_PHOTOS, builtin_splits, list_images, load_images, split_indices
from recon_attack.utils import UsageError


def write_images(folder, count):
    return write_photos(folder, [f'img{i:02d}.png' for i in range(count)], size=(40, 30))


def test_split_is_reproducible_disjoint_and_ten_to_one():
    train, val = split_indices(1000, batch_size=10, num_batches=22, seed=5)
    again_train, again_val = split_indices(1000, batch_size=10, num_batches=22, seed=5)
    other_train, _ = split_indices(1000, batch_size=10, num_batches=22, seed=6)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert not torch.equal(train, other_train)
    assert len(train) == 200 and len(val) == 20  # 22 batches: 20 train, 22 // 11 = 2 validation
    assert not set(train.tolist()) & set(val.tolist())


def test_whole_dataset_split_without_num_batches():
    train, val = split_indices(110, batch_size=8, num_batches=None, seed=0)
    assert (len(train), len(val)) == (100, 10)
    assert sorted(train.tolist() + val.tolist()) == list(range(110))


def test_more_batches_than_the_data_holds_names_the_counts():
    with pytest.raises(UsageError, match=r'= 400 images, but the data holds 100'):
        split_indices(100, batch_size=20, num_batches=20, seed=0)


def test_folder_and_zip_of_images_both_load(tmp_path):
    folder = write_images(tmp_path / 'photos' / 'nested', 5)
    archive = tmp_path / 'photos.zip'
    with zipfile.ZipFile(archive, 'w') as z:
        for path in sorted(folder.iterdir()):
            z.write(path, f'inside/{path.name}')
    from_folder = load_images(str(tmp_path / 'photos'), 24, str(tmp_path / 'cache'), 0)
    from_zip = load_images(str(archive), 24, str(tmp_path / 'cache'), 0)
    assert from_folder.images.shape == (5, 3, 24, 24) and from_folder.images.dtype == torch.uint8
    assert from_folder.names == [f'nested/img{i:02d}.png' for i in range(5)]
    assert from_zip.names == [f'inside/img{i:02d}.png' for i in range(5)]
    assert torch.equal(from_folder.images, from_zip.images)
    assert from_folder.fingerprints == from_zip.fingerprints and len(set(from_folder.fingerprints)) == 5


def test_celeba_root_is_recognised(tmp_path):
    write_images(tmp_path / 'celeba' / 'img_align_celeba', 3)
    (tmp_path / 'celeba' / 'list_attr_celeba.txt').write_text('not an image')
    root, names = list_images(str(tmp_path / 'celeba'))
    assert root.endswith('img_align_celeba') and len(names) == 3


def test_grey_and_rgba_images_become_rgb(tmp_path):
    folder = tmp_path / 'modes'
    folder.mkdir()
    Image.new('L', (20, 20), 128).save(folder / 'grey.png')
    Image.new('RGBA', (20, 20), (10, 20, 30, 0)).save(folder / 'rgba.png')
    images = load_images(str(folder), 16, str(tmp_path / 'cache'), 0).images
    assert images.shape == (2, 3, 16, 16)
    assert torch.all(images[0] == 128)
    assert images[1, :, 0, 0].tolist() == [10, 20, 30]


def test_builtin_validation_crops_come_only_from_the_portraits():
    splits = builtin_splits(32, batch_size=8, num_batches=12, seed=0)
    portraits = tuple(name.split('.')[0] for name in SAMPLE_VAL_PHOTOS)
    assert all(name.startswith(portraits) for name in splits.val_names)
    assert not any(splits.names[i].startswith(portraits) for i in splits.train_idx)
    assert len(splits.train_idx) == 88 and len(splits.val_idx) == 8
    again = builtin_splits(32, batch_size=8, num_batches=12, seed=0)
    assert torch.equal(splits.images, again.images)
