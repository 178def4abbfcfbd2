"""Open a versioned ONNX artifact and score with onnxruntime. NO torch here, ever (the service imports this).

API (what `service/` codes against; keep these names):

    from export.runtime import open_artifact, ArtifactError

    art = open_artifact("MODEL_REPO/v3", providers=None, threads=1)   # precision="int8": scorer.int8.onnx
        # verifies sha256 + size of every file in the manifest (a corrupted or truncated file raises
        # ArtifactError naming the file), builds the sessions, and checks the golden outputs.
        # providers=None: TensorRT (if tensorrt=True) > CUDA > CPU, whichever this onnxruntime build and
        # machine offer; one INFO log line says which is active and why. threads = intra-op threads.
    art.version, art.manifest, art.path          # str, dict, Path
    art.user_dim, art.udg_dim, art.max_history   # ints (udg_dim == 0 for models without UDG)
    art.oov_index, art.pad_index, art.provider   # 1, 0, e.g. "CPUExecutionProvider"
    art.schema                                   # dataset.schema.FeatureSchema: fields and vocabularies
    idx, unknown = art.encode_items(["12", "999999"])   # int64 [n], bool [n]; unknown ids -> OOV index 1
    fields = art.candidate_fields(idx, new_items=None)  # {"candidate_<field>": int64 [n, width]}: the
        # item table's tokens for known ids; for unknown ids the tokens of `new_items` ({raw id: row}) or PAD
    profile_idx = art.encode_profile({"cohort": "a1"})  # int64 [user fields]; missing/unknown value -> OOV
        # (or a hash bucket); an unknown field raises UnknownField (a ValueError) naming it; a numeric
        # field's number is bucketed by its declared edges, as in training.
    probs = art.score(user_vec, udg_vec, history_idx, candidate_idx, fields)  # float32 [N], ONE ort call
        # user_vec [user_dim] or [1, user_dim] f32; udg_vec likewise (None / ignored without UDG);
        # history_idx int64 [L] or [1, L], PAD (0) filled, most recent first, may be empty (L = 0);
        # candidate_idx int64 [N]; fields default to the item table's. Out-of-range indices -> OOV.
    art.can_batch                                # True when the version has the multi-user graph
    art.session_tuning                           # the scorer sessions' options: SESSION_TUNING_BY_KIND's row
        # for the manifest's model kind (DEFAULT_TUNING otherwise); an explicit spin= overrides its spinning
    probs_list = art.score_many([(user_vec, udg_vec, history_idx, candidate_idx, fields), ...])
        # several users in ONE ort call (scorer_multi.onnx): a list of float32 [N_i], the same values as
        # one `score` per user; fields may be None (the item table's)
    user_vec, udg_vec = art.cold_start(profile_idx)  # f32 [user_dim], f32 [udg_dim] (None without UDG)
        # an unseen user's base embedding (OOV id row + profile rows) and UDG embedding (meta generator)
    users = art.load_users()   # dict of numpy arrays from users.npz (for `udg publish`)

On CUDA, `score` uses IO binding (inputs copied once, output bound on the device), and with
`cuda_graph=True` a CUDA-graph path: candidates are padded to a bucket size (`CUDA_GRAPH_BUCKETS`) and the
history to max_history, each bucket captured once in its own graph (run option `gpu_graph_id`), inputs
updated in place. Requests larger than the largest bucket, or a failed capture, take the plain path.

`score_many` runs the multi-user graph with a plain run (IO binding on CUDA); CUDA graphs per (users,
candidates) bucket would be its next step on a GPU and are not built here.

`Artifact` is thread-safe for `score` / `cold_start` on the plain path (onnxruntime's `run` is); the
CUDA-graph path serialises calls per bucket with a lock (captured buffers are shared).
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataset.schema import FeatureSchema

# ArtifactError is part of this module's API (see above); it is the repository's, which reads the manifest.
from repository import META_FILE, SCORER_FILE, USERS_FILE, ArtifactError, read_manifest, verify_files

log = logging.getLogger(__name__)

CUDA_GRAPH_BUCKETS = (16, 64, 256, 1024, 4096)


def choose_providers(providers: list | None = None, tensorrt: bool = False,
                     device_id: int = 0) -> tuple[list, str]:
    """(providers list for InferenceSession, reason). Explicit `providers` are used as given."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers:
        return list(providers), "requested explicitly"
    cuda = {"device_id": device_id}
    if tensorrt and "TensorrtExecutionProvider" in available:
        return [("TensorrtExecutionProvider", {"device_id": device_id}), ("CUDAExecutionProvider", cuda),
                "CPUExecutionProvider"], "TensorRT requested and available"
    if "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"], "CUDA provider available"
    return ["CPUExecutionProvider"], f"no CUDA provider in this onnxruntime build (available: {available})"


def _provider_name(provider) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


@dataclass(frozen=True)
class SessionTuning:
    """onnxruntime session options for one model kind's graphs. `spin`: whether idle intra-op threads spin
    (None: onnxruntime's default, which spins); an explicit `spin` given to `open_artifact` wins."""

    optimization: str = "all"  # graph optimisation level: "basic", "extended" or "all"
    execution: str = "sequential"  # or "parallel": independent branches on inter-op threads
    spin: bool | None = None


DEFAULT_TUNING = SessionTuning()

# Per-kind settings, kept only where `udg bench model --kinds all --session-options` measured a gain over
# DEFAULT_TUNING at N = 100 and 1000 on 1 and 2 threads (journal docs/results/perf/bench-model-session-options.json).
# DIN's and DIEN's graphs are many small nodes: with 2 threads, spinning between them cost 1.5-3x at N = 1000
# (and DIEN at N = 100) on a shared machine; it changes nothing on 1 thread. The other kinds, the lower
# optimisation levels and parallel execution (7-100x slower on 2 threads) gained nothing, so they keep the default.
SESSION_TUNING_BY_KIND: dict[str, SessionTuning] = {"din": SessionTuning(spin=False), "dien": SessionTuning(spin=False)}

_OPTIMIZATION_LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
_EXECUTION_MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}


def session_tuning(kind: str | None) -> SessionTuning:
    """The tuning for a model kind (the manifest's model.kind); DEFAULT_TUNING for any kind not in the table."""
    return SESSION_TUNING_BY_KIND.get(kind or "", DEFAULT_TUNING)


def session_options(threads: int, tuning: SessionTuning = DEFAULT_TUNING, spin: bool | None = None):
    """ort.SessionOptions for `threads` intra-op threads under `tuning`; `spin`, when given, overrides the
    tuning's."""
    import onnxruntime as ort

    if tuning.optimization not in _OPTIMIZATION_LEVELS or tuning.execution not in _EXECUTION_MODES:
        raise ValueError(f"unknown session tuning {tuning}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    parallel = tuning.execution == "parallel"
    # Parallel mode runs independent nodes on the inter-op pool; give it as many threads as intra-op has.
    options.inter_op_num_threads = max(1, int(threads)) if parallel else 1
    options.execution_mode = getattr(ort.ExecutionMode, _EXECUTION_MODES[tuning.execution])
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPTIMIZATION_LEVELS[tuning.optimization])
    spin = tuning.spin if spin is None else spin
    if spin is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin else "0")
    return options


def _session(file: Path, providers: list, threads: int, spin: bool | None, extra_cuda: dict | None = None,
             tuning: SessionTuning = DEFAULT_TUNING):
    import onnxruntime as ort

    options = session_options(threads, tuning, spin)
    if extra_cuda:
        providers = [(name, {**opts, **extra_cuda}) if name == "CUDAExecutionProvider" else (name, opts)
                     for name, opts in (p if isinstance(p, tuple) else (p, {}) for p in providers)]
    try:
        return ort.InferenceSession(str(file), options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types
        raise ArtifactError(f"{file}: onnxruntime cannot load it ({error})") from None


@dataclass
class _Bucket:
    size: int
    graph_id: int
    inputs: dict = field(default_factory=dict)  # name -> OrtValue on the device
    output: object = None
    binding: object = None
    captured: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class Artifact:
    """One opened, verified model version. Create with `open_artifact`."""

    session_tuning: SessionTuning = DEFAULT_TUNING  # the scorer sessions' options (`session_tuning(kind)`)

    def __init__(self, path: Path, manifest: dict, scorer, meta, provider: str, device_id: int = 0,
                 cuda_graph_session=None, multi_scorer=None):
        self.path = Path(path)
        self.manifest = manifest
        self.version: str = manifest["version"]
        dims = manifest["dims"]
        self.user_dim: int = int(dims["user_dim"])
        self.udg_dim: int = int(dims["udg_dim"])
        self.max_history: int = int(dims["max_history"])
        vocab = manifest["vocab"]
        self.pad_index: int = int(vocab["pad_index"])
        self.oov_index: int = int(vocab["oov_index"])
        self.schema: FeatureSchema = FeatureSchema.from_json({**manifest["features"], "item_table": {}})
        self.n_items: int = len(self.schema.items)
        self.profile_fields: list[str] = self.schema.profile_fields
        self._items: dict[str, int] = self.schema.items.index
        self._item_tables = self._load_item_tables(manifest)
        self._scorer, self._meta = scorer, meta
        self.provider = provider
        self.on_gpu = provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self.device_id = device_id
        self._scorer_inputs = [spec["name"] for spec in manifest["graphs"]["scorer"]["inputs"]]
        self._meta_outputs = [spec["name"] for spec in manifest["graphs"]["meta"]["outputs"]]
        self._cuda_graph = cuda_graph_session
        self._buckets: dict[int, _Bucket] = {}
        self._multi = multi_scorer
        self.can_batch: bool = multi_scorer is not None

    def _load_item_tables(self, manifest: dict) -> dict[str, np.ndarray]:
        """Per item field: tokens [len(items) vocabulary rows, width] from items.npz (rows PAD/OOV empty)."""
        tables = {f.name: np.zeros((self.schema.items.known_size, f.width), np.int64) for f in self.schema.item_fields}
        if not tables:
            return tables
        with np.load(self.path / manifest["vocab"]["items"]["file"], allow_pickle=False) as data:
            known = data["known"]
            for spec in self.schema.item_fields:
                values = data[f"field_{spec.name}"][known]
                tables[spec.name][2:2 + len(values)] = values
        return tables

    # --- encoding ---------------------------------------------------------------------------------------
    def encode_items(self, raw_ids) -> tuple[np.ndarray, np.ndarray]:
        """Raw item ids -> (int64 indices, unknown mask): an id without a row of its own maps to the OOV index,
        or, where the vocabulary policy declares hash buckets, to its bucket (as in training)."""
        get, oov = self._items.get, self.oov_index
        # map() over the ids as given (no Python frame per id: 0.6x the time of a generator at N = 500); an id
        # that is not a str (a number) misses there and is looked up again as its string below
        try:
            index = np.fromiter(map(get, raw_ids, itertools.repeat(oov)), dtype=np.int64, count=len(raw_ids))
        except TypeError:  # an unhashable id: every id as its string
            index = np.fromiter((get(str(t), oov) for t in raw_ids), dtype=np.int64, count=len(raw_ids))
        unknown = index == oov
        if unknown.any():
            for j in np.flatnonzero(unknown).tolist():
                if not isinstance(raw_ids[j], str):
                    index[j] = get(str(raw_ids[j]), oov)
            unknown = index == oov
        if self.schema.items.hash_buckets and unknown.any():
            vocab = self.schema.items
            index[unknown] = [vocab.lookup(str(raw_ids[j])) for j in np.flatnonzero(unknown).tolist()]
        return index, unknown

    def candidate_fields(self, candidate_idx, raw_ids=None, new_items: dict | None = None) -> dict[str, np.ndarray]:
        """The scorer's candidate_<field> inputs: the item table's tokens per known candidate; an unknown one
        (OOV index) takes its row of `new_items` ({raw id: tokens of every field, concatenated}) when given,
        else no features (PAD), as unseen items had in training."""
        idx = np.asarray(candidate_idx, dtype=np.int64).reshape(-1)
        rows = np.where((idx > self.oov_index) & (idx < self.schema.items.known_size), idx, self.pad_index)
        out = {}
        for spec in self.schema.item_fields:
            out[f"candidate_{spec.name}"] = self._item_tables[spec.name][rows]
        if new_items and raw_ids is not None:
            offsets = np.cumsum([0] + [f.width for f in self.schema.item_fields])
            for j in np.flatnonzero((idx == self.oov_index) | (idx >= self.schema.items.known_size)).tolist():
                tokens = new_items.get(raw_ids[j])
                if tokens is None:
                    continue
                for k, spec in enumerate(self.schema.item_fields):
                    out[f"candidate_{spec.name}"][j] = tokens[offsets[k]:offsets[k + 1]]
        return out

    def encode_profile(self, profile: dict | None) -> np.ndarray:
        """{field: value} -> int64 [len(fields)]; missing or unknown values -> OOV (or a hash bucket); unknown
        fields -> UnknownField (a ValueError) naming it; numbers of numeric fields are bucketed."""
        return self.schema.encode_profile(profile)

    # --- scoring ----------------------------------------------------------------------------------------
    def _safe_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        bad = (ids < 0) | (ids >= self.n_items)
        return np.where(bad, self.oov_index, ids) if bad.any() else ids

    def feeds(self, user_vec, udg_vec, history_idx, candidate_idx, fields: dict | None = None) -> dict[str, np.ndarray]:
        """The scorer graph's input dict, validated and shaped (history padded to >= 1, cut to max_history)."""
        user = np.ascontiguousarray(np.asarray(user_vec, dtype=np.float32).reshape(1, -1))
        if user.shape[1] != self.user_dim:
            raise ValueError(f"user_vec has {user.shape[1]} values, the model expects {self.user_dim}")
        history = np.asarray(history_idx, dtype=np.int64).reshape(1, -1)[:, :self.max_history]
        if history.shape[1] == 0:
            history = np.zeros((1, 1), dtype=np.int64)
        candidates = np.ascontiguousarray(self._safe_ids(np.asarray(candidate_idx).reshape(-1)))
        feeds = {"user_vec": user, "history": np.ascontiguousarray(self._safe_ids(history)), "candidates": candidates}
        fields = self.candidate_fields(candidates) if fields is None else fields
        for spec in self.schema.item_fields:
            name = f"candidate_{spec.name}"
            values = np.ascontiguousarray(np.asarray(fields[name], dtype=np.int64).reshape(len(candidates), spec.width))
            vocab = len(spec.vocab)
            if values.size and (values.min() < 0 or values.max() >= vocab):
                values = np.where((values < 0) | (values >= vocab), self.oov_index, values)
            feeds[name] = values
        if self.udg_dim:
            if udg_vec is None:
                raise ValueError("this model uses UDG: udg_vec is required")
            udg = np.ascontiguousarray(np.asarray(udg_vec, dtype=np.float32).reshape(1, -1))
            if udg.shape[1] != self.udg_dim:
                raise ValueError(f"udg_vec has {udg.shape[1]} values, the model expects {self.udg_dim}")
            feeds["udg_vec"] = udg
        return feeds

    def score(self, user_vec, udg_vec, history_idx, candidate_idx, fields: dict | None = None) -> np.ndarray:
        """Click probabilities float32 [N] for one user and N candidates, in one onnxruntime call."""
        feeds = self.feeds(user_vec, udg_vec, history_idx, candidate_idx, fields)
        n = feeds["candidates"].shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        if self._cuda_graph is not None and n <= CUDA_GRAPH_BUCKETS[-1]:
            try:
                return self._score_cuda_graph(feeds, n)
            except Exception as error:  # capture unsupported: plain path from now on
                log.warning("CUDA-graph scoring failed (%s); using the plain CUDA path", error)
                self._cuda_graph = None
        if self.on_gpu:
            return self._score_io_binding(feeds)
        return self._scorer.run(None, feeds)[0]

    def score_many(self, requests: list[tuple]) -> list[np.ndarray]:
        """[(user_vec, udg_vec, history_idx, candidate_idx, fields or None), ...] -> probabilities per request,
        all users in ONE call of the multi-user graph (histories PAD-filled to the longest)."""
        if self._multi is None:
            raise ArtifactError(f"version {self.version} has no multi-user scorer graph (exported before it)")
        each = [self.feeds(*request) for request in requests]
        sizes = [f["candidates"].shape[0] for f in each]
        length = max(f["history"].shape[1] for f in each)
        history = np.full((len(each), length), self.pad_index, dtype=np.int64)
        for row, f in enumerate(each):
            history[row, :f["history"].shape[1]] = f["history"][0]
        feeds = {"history": history, "candidate_user": np.repeat(np.arange(len(each), dtype=np.int64), sizes)}
        for name in each[0]:
            if name != "history":
                feeds[name] = np.ascontiguousarray(np.concatenate([f[name] for f in each]))
        if sum(sizes) == 0:
            return [np.zeros(0, np.float32) for _ in each]
        probabilities = (self._score_io_binding(feeds, self._multi) if self.on_gpu
                         else self._multi.run(None, feeds)[0])
        return np.split(probabilities, np.cumsum(sizes)[:-1])

    def _score_io_binding(self, feeds: dict[str, np.ndarray], session=None) -> np.ndarray:
        session = session or self._scorer
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("probabilities", "cuda", self.device_id)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def _bucket(self, n: int) -> _Bucket:
        import onnxruntime as ort

        size = next(b for b in CUDA_GRAPH_BUCKETS if b >= n)
        bucket = self._buckets.get(size)
        if bucket is None:
            bucket = _Bucket(size=size, graph_id=len(self._buckets) + 1)
            shapes = {"user_vec": ((1, self.user_dim), np.float32), "udg_vec": ((1, self.udg_dim), np.float32),
                      "history": ((1, self.max_history), np.int64), "candidates": ((size,), np.int64),
                      **{f"candidate_{f.name}": ((size, f.width), np.int64) for f in self.schema.item_fields}}
            binding = self._cuda_graph.io_binding()
            for name in self._scorer_inputs:
                shape, dtype = shapes[name]
                value = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), "cuda", self.device_id)
                bucket.inputs[name] = value
                binding.bind_ortvalue_input(name, value)
            bucket.output = ort.OrtValue.ortvalue_from_shape_and_type((size,), np.float32, "cuda", self.device_id)
            binding.bind_ortvalue_output("probabilities", bucket.output)
            bucket.binding = binding
            self._buckets[size] = bucket
        return bucket

    def _score_cuda_graph(self, feeds: dict[str, np.ndarray], n: int) -> np.ndarray:
        import onnxruntime as ort

        bucket = self._bucket(n)
        history = np.zeros((1, self.max_history), dtype=np.int64)
        history[:, :feeds["history"].shape[1]] = feeds["history"]
        padded = {**feeds, "history": history}
        for name in self._scorer_inputs:  # padding candidates (and their fields) score PAD; dropped below
            if name.startswith("candidate"):
                value = np.zeros((bucket.size, *feeds[name].shape[1:]), dtype=np.int64)
                value[:n] = feeds[name]
                padded[name] = value
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(bucket.graph_id))
        with bucket.lock:
            for name, value in bucket.inputs.items():
                value.update_inplace(padded[name])
            self._cuda_graph.run_with_iobinding(bucket.binding, options)  # first run per id captures
            bucket.captured = True
            return bucket.output.numpy()[:n].copy()

    # --- cold start -------------------------------------------------------------------------------------
    def cold_start(self, profile_idx) -> tuple[np.ndarray, np.ndarray | None]:
        """Profile indices [3] (or [B, 3]) -> (user_vec, udg_vec) for a user unseen in training."""
        profile = np.asarray(profile_idx, dtype=np.int64)
        single = profile.ndim == 1
        profile = np.ascontiguousarray(profile.reshape(-1, len(self.profile_fields)))
        profile = np.where((profile < 0), self.oov_index, profile)
        outputs = dict(zip(self._meta_outputs, self._meta.run(None, {"profile": profile}), strict=True))
        user_vec, udg_vec = outputs["user_vec"], outputs.get("udg_vec")
        if single:
            return user_vec[0], None if udg_vec is None else udg_vec[0]
        return user_vec, udg_vec

    # --- other ------------------------------------------------------------------------------------------
    def load_users(self) -> dict[str, np.ndarray]:
        """users.npz as a dict of arrays (raw ids, vectors, histories, profiles); see export/onnx_export.py."""
        with np.load(self.path / USERS_FILE, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def check_golden(self) -> float:
        """Run the manifest's golden inputs; raises ArtifactError above its tolerance. Returns the max diff."""
        golden = self.manifest["golden"]
        atol = float(golden.get("atol", 1e-4))
        worst = 0.0
        for case in golden["scorer"]:
            i = case["inputs"]
            fields = {k: v for k, v in i.items() if k.startswith("candidate_")}
            got = self.score(i["user_vec"], i.get("udg_vec"), i["history"], i["candidates"], fields)
            worst = max(worst, _check(got, case["outputs"]["probabilities"], atol, self.path / SCORER_FILE))
        for case in golden.get("scorer_multi", []) if self._multi is not None else []:
            dtypes = {spec["name"]: np.float32 if spec["dtype"] == "float32" else np.int64
                      for spec in self.manifest["graphs"]["scorer_multi"]["inputs"]}
            feeds = {k: np.asarray(v, dtype=dtypes[k]) for k, v in case["inputs"].items()}
            got = self._multi.run(None, feeds)[0]
            file = self.path / self.manifest["graphs"]["scorer_multi"]["file"]
            worst = max(worst, _check(got, case["outputs"]["probabilities"], atol, file))
        for case in golden["meta"]:
            feeds = {"profile": np.asarray(case["inputs"]["profile"], dtype=np.int64)}
            outs = self._meta.run(list(case["outputs"]), feeds)
            for name, got in zip(case["outputs"], outs, strict=True):
                worst = max(worst, _check(got, case["outputs"][name], atol, self.path / META_FILE))
        return worst

    def warmup(self, sizes=(1, 16, 100, 1000)) -> None:
        """A few calls of each size, off the request path; with CUDA graphs, every bucket is captured here
        too, so that no request pays for a capture."""
        if self._cuda_graph is not None:
            sizes = tuple(sorted(set(sizes) | set(CUDA_GRAPH_BUCKETS)))
        user = np.zeros(self.user_dim, np.float32)
        udg = np.zeros(self.udg_dim, np.float32) if self.udg_dim else None
        history = np.full(min(self.max_history, 8), 2, np.int64)
        for n in sizes:
            for _ in range(2):
                self.score(user, udg, history, np.full(n, 2, np.int64))
        if self._multi is not None:  # the micro-batcher's graph, so that its first batch pays no warm-up either
            for n in sizes[:2]:
                self.score_many([(user, udg, history, np.full(n, 2, np.int64), None)] * 2)


def _check(got, expected, atol: float, file: Path) -> float:
    expected = np.asarray(expected, dtype=np.float32)
    got = np.asarray(got, dtype=np.float32)
    if got.shape != expected.shape:
        raise ArtifactError(f"{file}: golden output shape {got.shape}, expected {expected.shape}")
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    if not diff <= atol:
        raise ArtifactError(f"{file}: golden outputs differ by {diff:.3g} (> {atol})")
    return diff


def open_artifact(path, providers: list | None = None, threads: int = 1, *, verify: bool = True,
                  tensorrt: bool = False, cuda_graph: bool = False, device_id: int = 0,
                  spin: bool | None = None, verify_users: bool = True, precision: str = "fp32") -> Artifact:
    """Verify and open MODEL_REPO/<version>; see the module docstring."""
    path = Path(path)
    manifest = read_manifest(path)
    if precision not in ("fp32", "int8"):
        raise ArtifactError(f"precision must be 'fp32' or 'int8', not {precision!r}")
    if precision == "int8":
        int8 = manifest["graphs"].get("scorer_int8")
        if int8 is None:
            raise ArtifactError(f"{path}: no int8 scorer in this version (export it with --int8)")
        # The int8 graph scores in place of the fp32 one; its golden bound is its own (quantisation error).
        manifest = {**manifest, "graphs": {**manifest["graphs"], "scorer": int8},
                    "golden": {**manifest["golden"], "atol": int8["atol"]}}
    if verify:
        verify_files(path, manifest, skip=() if verify_users else (USERS_FILE,))
    chosen, reason = choose_providers(providers, tensorrt, device_id)
    tuning = session_tuning(manifest.get("model", {}).get("kind"))
    scorer = _session(path / manifest["graphs"]["scorer"]["file"], chosen, threads, spin, tuning=tuning)
    meta = _session(path / manifest["graphs"]["meta"]["file"], chosen, threads, spin)
    active = scorer.get_providers()[0]
    wanted = _provider_name(chosen[0])
    if active != wanted:
        reason = f"{wanted} was requested ({reason}) but failed to initialise; fell back"
    graph_session = None
    if cuda_graph and active == "CUDAExecutionProvider":
        try:
            graph_session = _session(path / manifest["graphs"]["scorer"]["file"], chosen, threads, spin,
                                     extra_cuda={"enable_cuda_graph": "1"}, tuning=tuning)
        except ArtifactError as error:
            log.warning("CUDA graphs unavailable for %s: %s", path, error)
    log.info("artifact %s: onnxruntime %s, %d intra-op thread(s) (%s)%s", manifest["version"], active, threads,
             reason, ", CUDA graphs on" if graph_session is not None else "")
    multi = manifest["graphs"].get("scorer_multi")
    multi_session = _session(path / multi["file"], chosen, threads, spin, tuning=tuning) if multi else None
    artifact = Artifact(path, manifest, scorer, meta, active, device_id, graph_session, multi_session)
    artifact.session_tuning = tuning
    if verify:
        artifact.check_golden()
    return artifact
