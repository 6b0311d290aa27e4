"""Reading raw medical images, volumes and label maps (paper 2.2).

One job: turn a file into an array, loudly. :func:`read_volume` reads NIfTI/MGH through
nibabel and NRRD and MHA/MHD through SimpleITK (with voxel spacing); :func:`read_raw_image`
and :func:`read_raw_label` read PNG/BMP/JPG/TIF at any bit depth (for
:mod:`cosmoslib.data.preprocess`); :func:`read_image` and :func:`read_label` read the files
of the COSMOS layout -- the readers ``index``, ``embed`` and ``evaluate`` all share, so what the
indexer accepts every later verb can read. An image wider than 8 bits is min-max normalised to
0..255 (:func:`minmax_normalize`, the paper's preprocessing rule, also used by
:mod:`cosmoslib.data.preprocess`; :func:`decode_image` says whether it was). Any unreadable file raises
:class:`cosmoslib.files.InputError` naming the file and the problem.
"""

from __future__ import annotations

import io as _stdio
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import tifffile
from PIL import Image

from cosmoslib.files import (
    InputError,
)

# --------------------------------------------------------------------------------------------
# small shared helpers
# --------------------------------------------------------------------------------------------

#: Image suffixes the reader accepts in ``images/`` (labels: ``.png`` first, then these).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: Suffixes of 3D/4D volumes that :func:`read_volume` reads.
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".mgh")

def file_stem(path: str | os.PathLike) -> str:
    """File name without its extension; double extensions ``.nii.gz`` count as one.

    >>> file_stem("a/case 01.nii.gz")
    'case 01'
    """
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES + IMAGE_SUFFIXES:
        if len(name) > len(suffix) and name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, ...]]:
    """Read a 3D or 4D medical volume in a fixed anatomical orientation.

    Parameters
    ----------
    path : NIfTI (``.nii``, ``.nii.gz``), MGH (``.mgz``), NRRD (``.nrrd``, ``.nhdr``) or
        MetaImage (``.mha``, ``.mhd``) file.

    Returns
    -------
    array : ndarray
        3D: ``(S, P, L)`` -- axis 0 runs inferior -> superior, axis 1 anterior -> posterior,
        axis 2 patient right -> left. An axial slice ``array[k]`` is therefore shown in the
        radiological convention (anterior at the top, patient right on the left). 4D:
        ``(N, S, P, L)``, one 3D volume per index of the fourth file axis (the paper's
        ``(N, W, H, D)``). Trailing singleton axes beyond the third (``(x, y, z, 1)``) are
        dropped. The dtype is the file's (after the file's intensity scaling), never converted.
    spacing : tuple of float
        Voxel size in mm along the three spatial array axes, same order as ``array``.

    Raises
    ------
    InputError
        Missing or unreadable file, vector (multi-component) voxels, or not 3D/4D.

    Notes
    -----
    NIfTI and MGH files are read with nibabel and reoriented to the closest canonical (RAS+)
    axes, then reversed and flipped to ``(S, P, L)``: nibabel keeps NaN voxels (SimpleITK's NIfTI
    reader turns them into 0, which would hide a broken volume) and accepts the non-orthonormal
    direction cosines SimpleITK refuses. NRRD and MetaImage go through SimpleITK, reoriented to
    LPS with ``DICOMOrient`` (``GetArrayFromImage`` then yields ``(S, P, L)``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    if path.name.lower().endswith((".nii", ".nii.gz", ".mgz", ".mgh")):
        return _read_volume_nibabel(path)

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"unreadable volume ({_first_line(exc)})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"{image.GetNumberOfComponentsPerPixel()}-component voxels, expected a scalar volume")
    size = list(image.GetSize())
    while len(size) > 3 and size[-1] == 1:  # (x, y, z, 1): a 3D volume stored as 4D
        extract = sitk.ExtractImageFilter()
        extract.SetSize(size[:-1] + [0])
        extract.SetIndex([0] * len(size))
        extract.SetDirectionCollapseToStrategy(sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
        image = extract.Execute(image)
        size = size[:-1]
    dim = image.GetDimension()
    if dim == 3:
        oriented = sitk.DICOMOrient(image, "LPS")
        return sitk.GetArrayFromImage(oriented), tuple(float(s) for s in oriented.GetSpacing()[::-1])
    if dim == 4:
        extract = sitk.ExtractImageFilter()
        extract.SetSize(size[:3] + [0])
        extract.SetDirectionCollapseToStrategy(sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
        frames, spacing = [], None
        for t in range(size[3]):
            extract.SetIndex([0, 0, 0, t])
            frame = sitk.DICOMOrient(extract.Execute(image), "LPS")
            frames.append(sitk.GetArrayFromImage(frame))
            spacing = tuple(float(s) for s in frame.GetSpacing()[::-1])
        return np.stack(frames), spacing
    raise InputError(path, f"{dim}-D image, expected a 3D or 4D volume")


def _read_volume_nibabel(path: Path):

    try:
        img = nib.load(str(path))
        while len(img.shape) > 3 and img.shape[-1] == 1:  # (x, y, z, 1): a 3D volume stored as 4D
            img = img.slicer[..., 0]
        if len(img.shape) not in (3, 4):
            raise InputError(path, f"{len(img.shape)}-D image of shape {img.shape}, expected a 3D or 4D volume")
        img = nib.as_closest_canonical(img)
        data = np.asanyarray(img.dataobj)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"unreadable volume ({_first_line(exc)})") from None
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])[::-1]
    # RAS+ (x: left->right, y: posterior->anterior, z: inferior->superior) to (S, P, L):
    # reverse the spatial axes, then flip P and L.
    if data.ndim == 3:
        return np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1]), zooms
    return np.ascontiguousarray(data.transpose(3, 2, 1, 0)[:, :, ::-1, ::-1]), zooms


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages put the useful sentence last; keep them short.
    return (lines[-1] if lines else type(exc).__name__)[:200]


def read_raw_image(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D image as stored: ``(H, W)`` or ``(H, W, 3)``, any dtype.

    TIFF goes through tifffile (keeps 16-bit and float data), everything else through Pillow.
    Alpha channels are dropped, palette images become RGB, ``(3|4, H, W)`` TIFFs are moved to
    channels-last.

    Raises
    ------
    InputError
        Missing, unreadable or not a 2D grey/RGB image.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    if path.suffix.lower() in (".tif", ".tiff"):

        try:
            arr = np.asarray(tifffile.imread(path))
        except Exception as exc:
            raise InputError(path, f"unreadable TIFF ({_first_line(exc)})") from None
        if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
            arr = np.moveaxis(arr, 0, -1)
    else:

        try:
            with Image.open(path) as im:
                im.load()
                if im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                    im = im.convert("RGB")
                arr = np.asarray(im)
        except Exception as exc:
            raise InputError(path, f"unreadable image ({_first_line(exc)})") from None
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):  # grey+alpha or RGBA: drop alpha
        arr = arr[..., :1][..., 0] if arr.shape[-1] == 2 else arr[..., :3]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        raise InputError(path, f"array of shape {arr.shape}: expected a 2D grey (H, W) or RGB (H, W, 3) image")
    return np.ascontiguousarray(arr)


def read_raw_label(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D label map as stored, as a non-negative integer array ``(H, W)``.

    Palette PNGs give their palette indices (the usual way label maps are stored). An RGB label
    whose three channels are equal is read as grey.

    Raises
    ------
    InputError
        Unreadable; RGB with differing channels (a colour-coded map: convert it to values
        first); negative or non-integer values.
    """
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        arr = read_raw_image(path)
    else:

        if not path.is_file():
            raise InputError(path, "file not found")
        try:
            with Image.open(path) as im:
                im.load()
                if im.mode in ("RGBA", "LA"):
                    im = im.convert(im.mode[:-1])
                arr = np.asarray(im)  # palette mode "P": the indices are the label values
        except Exception as exc:
            raise InputError(path, f"unreadable label image ({_first_line(exc)})") from None
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
    if arr.ndim == 3:
        if arr.shape[-1] >= 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
            arr = arr[..., 0]
        else:
            raise InputError(path, "RGB label with differing channels (colour-coded); expected one value per object")
    return as_label_values(arr, path)


def as_label_values(arr: np.ndarray, path=None) -> np.ndarray:
    """Check that ``arr`` holds non-negative integer label values and return it as an int array.

    Float label volumes (common in NIfTI) are accepted when every value is a whole number.

    Raises
    ------
    InputError
        Non-finite, fractional or negative values (names ``path``).
    """
    arr = np.asarray(arr)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InputError(path, "label holds NaN or infinite values")
        if not np.array_equal(arr, np.round(arr)):
            raise InputError(path, "label holds fractional values; expected integer label values")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise InputError(path, f"label of dtype {arr.dtype}; expected integers")
    if arr.size and arr.min() < 0:
        raise InputError(path, f"label holds negative values (min {arr.min()})")
    return arr


def minmax_normalize(img: np.ndarray, clip_percentiles=None, path=None) -> np.ndarray:
    """Min-max normalise an image to ``uint8`` 0..255 (paper: ``I_n = 255 (I - Imin)/(Imax - Imin)``).

    Parameters
    ----------
    img : 2D grey or ``(H, W, 3)`` RGB array of any numeric dtype (RGB: one min and max over all
        channels, so colours keep their balance).
    clip_percentiles : ``(low, high)`` in percent, optional
        Clip intensities to these percentiles first (the authors' code uses ``(0.95, 99.5)``),
        so a few extreme voxels do not squash the contrast.
    path : file named in the error.

    Returns
    -------
    uint8 array of the same shape; values rounded to the nearest integer, min -> 0, max -> 255.

    Raises
    ------
    InputError
        NaN/infinite values, or a constant image (the formula divides by zero).
    """
    a = np.asarray(img, dtype=np.float64)
    if not np.isfinite(a).all():
        raise InputError(path, f"{int((~np.isfinite(a)).sum())} NaN/infinite value(s); cannot normalise")
    if clip_percentiles is not None:
        lo, hi = np.percentile(a, clip_percentiles)
        a = np.clip(a, lo, hi)
    lo, hi = a.min(), a.max()
    if hi == lo:
        raise InputError(path, f"constant intensity ({lo:g}); min-max normalisation undefined")
    return np.rint(255.0 * (a - lo) / (hi - lo)).astype(np.uint8)



@dataclass(frozen=True)
class DecodedImage:
    """A COSMOS-layout image as every verb sees it (:func:`decode_image`).

    Attributes
    ----------
    pixels : ndarray
        ``uint8`` ``(H, W)`` grey or ``(H, W, 3)`` RGB.
    stored_dtype : str
        The dtype the file holds (``"uint8"``, ``"uint16"``, ``"int16"``, ...).
    rescaled : bool
        True when the stored values did not fit 0..255 and were min-max normalised to 0..255
        (:func:`minmax_normalize`, the paper's rule of section 2.2); False when the pixels are
        the stored values.
    """

    pixels: np.ndarray
    stored_dtype: str
    rescaled: bool


def decode_image(path: str | os.PathLike) -> DecodedImage:
    """Read a COSMOS-layout image and say how it was brought to ``uint8``.

    * ``uint8`` files are returned as stored;
    * integer files of another width (16-bit PNG, int16/uint16/int32 TIFF, ...) whose values
      already lie in 0..255 are converted losslessly;
    * other integer files -- real 16-bit data such as a CT or microscopy slice -- are min-max
      normalised to 0..255 with :func:`minmax_normalize`, the rule the paper's preprocessing
      (and :func:`cosmoslib.data.preprocess.prepare`) applies to every slice, without percentile
      clipping (a COSMOS folder carries no dataset descriptor). ``rescaled`` records it, and
      :func:`cosmoslib.data.indexer.index` writes it to the manifest (column ``rescaled``).

    The embedding cache and the result shards are keyed by content (the decoded pixels, the file
    bytes), so a rescaled image is one input like any other: the same file gives the same pixels
    in ``index``, ``embed`` and ``evaluate``.

    Raises
    ------
    InputError
        Missing or unreadable file; a wider-than-8-bit image of constant intensity (min-max
        normalisation divides by zero: nothing to segment); float data (run it through
        ``cosmos prepare``, whose descriptor says how to normalise it). The error names the file.
    """
    arr = read_raw_image(path)
    if arr.dtype == np.uint8:
        return DecodedImage(arr, "uint8", False)
    if arr.dtype.kind in "iu":
        if arr.size and arr.min() >= 0 and arr.max() <= 255:
            return DecodedImage(arr.astype(np.uint8), str(arr.dtype), False)
        try:
            pixels = minmax_normalize(arr, path=path)
        except InputError as exc:
            raise InputError(path, f"{arr.dtype} image of {exc.problem}; nothing to segment") from None
        return DecodedImage(pixels, str(arr.dtype), True)
    lo, hi = (arr.min(), arr.max()) if arr.size else (0, 0)
    raise InputError(path, f"{arr.dtype} image with values {lo}..{hi}; expected an integer image "
                           f"(8-bit, or wider and min-max normalised): convert float data with "
                           f"`cosmos prepare` and a descriptor")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a COSMOS-layout image: ``uint8`` ``(H, W)`` grey or ``(H, W, 3)`` RGB.

    The pixels of :func:`decode_image`: 8-bit files as stored, wider integer files (16-bit PNG,
    int16 TIFF, ...) losslessly when their values lie in 0..255, else min-max normalised to
    0..255 as the paper's preprocessing does.

    Raises
    ------
    InputError
        Missing/unreadable file, a wider-than-8-bit image of constant intensity, or float data.
    """
    return decode_image(path).pixels


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a COSMOS-layout label PNG: ``uint8`` ``(H, W)``, 0 = background.

    Raises
    ------
    InputError
        Unreadable, colour-coded RGB, or values outside 0..255.
    """
    arr = read_raw_label(path)
    if arr.size and arr.max() > 255:
        raise InputError(path, f"label value {arr.max()} > 255; a COSMOS label holds values 0..255")
    return arr.astype(np.uint8, copy=False)


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``(H, W)`` or ``(H, W, 3)`` array (deterministic: no timestamps)."""

    arr = np.ascontiguousarray(arr)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"PNG writer expects uint8 (H, W) or (H, W, 3), got {arr.dtype} {arr.shape}")
    buf = _stdio.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


