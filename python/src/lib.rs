//! `peftdb._native`: the Python bindings of peftdb, a thin shell over the library (the package
//! `python/peftdb` wraps it in a Pythonic layer: records as dataclasses, progress bars, the exception
//! hierarchy of `peftdb.errors`).
//!
//! Every long operation (ingest, nearest, suggest, evaluate, loading a model) releases the GIL. Progress
//! reaches an optional Python callable `progress(event, done, total)`; it is called with the GIL held, on
//! the calling thread, which is also where pending signals are checked: Ctrl-C (or an exception raised by
//! the callback) stops an ingestion after the batch being committed, and the store keeps every batch
//! committed before. Records cross the boundary as the same JSON the CLI's `--json` prints, so the two
//! always agree.

use numpy::PyArray1;
use peftdb::embed::SpaceId;
use peftdb::engine::{parse_device, Engine, EngineOptions, ScoreOptions, DEFAULT_TEMPERATURE};
use peftdb::error::ErrorKind;
use peftdb::index::{IndexConfig, IndexManager, SearchMode};
use peftdb::ingest::{ingest_zoo, IngestEvent, IngestOptions};
use peftdb::object::{read_adapter, LightweightObject, MethodKind, ReadOptions};
use peftdb::query::{Nearest, Similarity};
use peftdb::store::{ObjectId, ObjectRecord, Store as LibStore};
use peftdb::suggest::{suggest as lib_suggest, write_suggestion, SuggestConfig, SuggestEvent};
use peftdb::task::{Split, Task};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The `peftdb.errors` class of an error kind.
fn class_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Locked => "StoreLockedError",
        ErrorKind::NewerSchema | ErrorKind::OlderSchema => "SchemaVersionError",
        ErrorKind::StoreMissing => "StoreNotFoundError",
        ErrorKind::AlreadyExists => "AlreadyExistsError",
        ErrorKind::NotAStore => "NotAStoreError",
        ErrorKind::NeedsRecovery => "NeedsRecoveryError",
        ErrorKind::ReadOnly => "ReadOnlyError",
        ErrorKind::NotFound => "NotFoundError",
        ErrorKind::InvalidAdapter => "InvalidAdapterError",
        ErrorKind::InvalidTask => "InvalidTaskError",
        ErrorKind::Model => "ModelError",
        ErrorKind::InvalidInput => "InvalidInputError",
        ErrorKind::NoCandidates => "NoCandidatesError",
        ErrorKind::Io => "StorageError",
        ErrorKind::Corrupt => "CorruptError",
        ErrorKind::Interrupted => "InterruptedError",
        _ => "Error",
    }
}

/// A library error as the `peftdb.errors` exception of its kind, keeping the library's message.
fn to_py(e: impl Into<peftdb::Error>) -> PyErr {
    let e: peftdb::Error = e.into();
    py_error(e.kind(), e.to_string())
}

/// The `peftdb.errors` exception of `kind` with `msg`.
fn py_error(kind: ErrorKind, msg: String) -> PyErr {
    Python::attach(|py| {
        let made = py
            .import("peftdb.errors")
            .and_then(|m| m.getattr(class_name(kind)))
            .and_then(|cls| cls.call1((msg.clone(),)));
        match made {
            Ok(exc) => PyErr::from_value(exc),
            // The package is not importable (the native module used alone): a plain RuntimeError.
            Err(_) => pyo3::exceptions::PyRuntimeError::new_err(msg),
        }
    })
}

/// A bad argument: `InvalidInputError`, worded as the library words its own (`invalid option: ...`).
fn invalid(msg: impl Into<String>) -> PyErr {
    py_error(
        ErrorKind::InvalidInput,
        format!("invalid option: {}", msg.into()),
    )
}

fn parse<T: std::str::FromStr>(what: &str, s: &str) -> PyResult<T>
where
    T::Err: std::fmt::Display,
{
    s.parse::<T>()
        .map_err(|e| invalid(format!("{what} {s:?}: {e}")))
}

fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("records serialize")
}

/// The Python progress callable, the first error it (or a pending signal) raised, and the cancel flag the
/// library polls.
struct Progress {
    callback: Option<Py<PyAny>>,
    error: Mutex<Option<PyErr>>,
    cancel: Arc<AtomicBool>,
}

impl Progress {
    fn new(callback: Option<Py<PyAny>>) -> Progress {
        Progress {
            callback,
            error: Mutex::new(None),
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Report progress; check for Ctrl-C. Either failing asks the library to stop.
    fn emit(&self, event: &str, done: usize, total: usize) {
        if self.cancel.load(Ordering::SeqCst) {
            return;
        }
        Python::attach(|py| {
            let r = py.check_signals().and_then(|_| match &self.callback {
                Some(cb) => cb.call1(py, (event, done, total)).map(|_| ()),
                None => Ok(()),
            });
            if let Err(e) = r {
                self.error.lock().expect("progress lock").get_or_insert(e);
                self.cancel.store(true, Ordering::SeqCst);
            }
        });
    }

    /// The operation's result, unless the callback or a signal raised first: then that exception.
    fn finish<T, E: Into<peftdb::Error>>(&self, r: Result<T, E>) -> PyResult<T> {
        if let Some(e) = self.error.lock().expect("progress lock").take() {
            return Err(e);
        }
        r.map_err(to_py)
    }
}

/// A base model loaded once, reusable across `suggest` and `evaluate` calls.
#[pyclass(module = "peftdb._native", frozen)]
struct Model {
    engine: Arc<Engine>,
    #[pyo3(get)]
    path: PathBuf,
    #[pyo3(get)]
    device: String,
    #[pyo3(get)]
    max_len: usize,
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path, device = "cpu", max_len = 128, prompt = None, dtype = "f32", matmul = "f32"))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        device: &str,
        max_len: usize,
        prompt: Option<String>,
        dtype: &str,
        matmul: &str,
    ) -> PyResult<Model> {
        let base_dtype = peftdb::engine::parse_base_dtype(dtype).map_err(to_py)?;
        let matmul = peftdb::engine::MatmulPrecision::parse(matmul).map_err(to_py)?;
        let engine = py
            .detach(|| {
                let dev = parse_device(device)?;
                let defaults = EngineOptions::default();
                Engine::load_with(
                    &path,
                    &dev,
                    &EngineOptions {
                        max_len,
                        prompt: prompt.unwrap_or(defaults.prompt),
                        base_dtype,
                        matmul,
                    },
                )
            })
            .map_err(to_py)?;
        Ok(Model {
            engine: Arc::new(engine),
            path,
            device: device.to_string(),
            max_len,
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "Model({:?}, device={:?}, max_len={})",
            self.path.display().to_string(),
            self.device,
            self.max_len
        )
    }
}

/// A new task given as data (the Python `TaskData`): name, `(id, verbalizer)` labels and
/// `(text, label id)` examples per split.
#[pyclass(module = "peftdb._native", frozen)]
struct TaskSpec {
    task: Arc<Task>,
}

#[pymethods]
impl TaskSpec {
    #[new]
    #[pyo3(signature = (name, labels, train, dev, test, group = None))]
    fn new(
        name: &str,
        labels: Vec<(String, String)>,
        train: Vec<(String, String)>,
        dev: Vec<(String, String)>,
        test: Vec<(String, String)>,
        group: Option<String>,
    ) -> PyResult<TaskSpec> {
        let origin = PathBuf::from(format!("<TaskData {name}>"));
        let task =
            Task::from_examples(&origin, name, group, labels, [train, dev, test]).map_err(to_py)?;
        Ok(TaskSpec {
            task: Arc::new(task),
        })
    }

    /// Load a task folder (task.json + train/dev/test.jsonl).
    #[staticmethod]
    fn load(py: Python<'_>, dir: PathBuf) -> PyResult<TaskSpec> {
        let task = py.detach(|| Task::load(&dir)).map_err(to_py)?;
        Ok(TaskSpec {
            task: Arc::new(task),
        })
    }

    #[getter]
    fn name(&self) -> String {
        self.task.name.clone()
    }

    /// `(id, verbalizer)` of every label, in order.
    #[getter]
    fn labels(&self) -> Vec<(String, String)> {
        self.task
            .labels
            .iter()
            .map(|l| (l.id.clone(), l.text.clone()))
            .collect()
    }

    /// Examples per split: `{"train": n, "dev": n, "test": n}`.
    fn counts(&self) -> Vec<(String, usize)> {
        [Split::Train, Split::Dev, Split::Test]
            .into_iter()
            .map(|s| (s.name().to_string(), self.task.split(s).len()))
            .collect()
    }
}

/// An open store. `close()` (or leaving a `with` block) releases it, and with it the write lock, once the
/// operations in flight end. The lock guards only the handle's swap: an operation holds its own `Arc`, so a
/// progress callback may use the same store (no lock is held while it runs).
#[pyclass(module = "peftdb._native", frozen)]
struct Store {
    inner: Mutex<Option<Arc<LibStore>>>,
    #[pyo3(get)]
    path: PathBuf,
}

impl Store {
    /// Run `f` on the open store with the GIL released.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&LibStore) -> PyResult<T> + Send,
    ) -> PyResult<T> {
        let store = self.inner.lock().expect("store lock").clone();
        let Some(store) = store else {
            return Err(PyValueError::new_err(format!(
                "{}: the store is closed; open it again with peftdb.Store(path)",
                self.path.display()
            )));
        };
        py.detach(|| f(&store))
    }
}

fn object_json(o: &ObjectRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(o).expect("records serialize");
    v["method"] = serde_json::json!(o.method_kind().to_string());
    v
}

#[pymethods]
impl Store {
    /// Open the store at `path`: for writing (one writer at a time), read-only with `read_only`, created
    /// when missing with `create`.
    #[new]
    #[pyo3(signature = (path, create = false, read_only = false))]
    fn new(py: Python<'_>, path: PathBuf, create: bool, read_only: bool) -> PyResult<Store> {
        if create && read_only {
            return Err(invalid("create and read_only exclude each other"));
        }
        let store = py
            .detach(|| {
                if read_only {
                    LibStore::open_for_reading(&path)
                } else if create {
                    LibStore::open_or_create(&path)
                } else {
                    LibStore::open(&path)
                }
            })
            .map_err(to_py)?;
        Ok(Store {
            path: store.path().to_path_buf(),
            inner: Mutex::new(Some(Arc::new(store))),
        })
    }

    /// Close the store (idempotent).
    fn close(&self, py: Python<'_>) {
        py.detach(|| drop(self.inner.lock().expect("store lock").take()));
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().expect("store lock").is_none()
    }

    #[getter]
    fn writable(&self, py: Python<'_>) -> PyResult<bool> {
        self.with(py, |s| Ok(s.is_writable()))
    }

    /// Ingest adapter folders or zoo folders; JSON list of `{path, status, id | reason}`.
    #[pyo3(signature = (paths, manifest = None, task = None, base_model = None, strict = false,
        allow_non_finite = false, batch_size = 64, progress = None))]
    #[allow(clippy::too_many_arguments)]
    fn ingest(
        &self,
        py: Python<'_>,
        paths: Vec<PathBuf>,
        manifest: Option<PathBuf>,
        task: Option<String>,
        base_model: Option<String>,
        strict: bool,
        allow_non_finite: bool,
        batch_size: usize,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<String> {
        if paths.is_empty() && manifest.is_none() {
            return Err(invalid(
                "nothing to ingest: give adapter or zoo folders, or manifest=FILE",
            ));
        }
        let progress = Progress::new(progress);
        let opts = IngestOptions {
            strict,
            allow_non_finite,
            batch_size,
            task,
            base_model,
            cancel: Some(progress.cancel.clone()),
        };
        let seen = std::sync::atomic::AtomicUsize::new(0);
        let all = std::sync::atomic::AtomicUsize::new(0);
        let r = self.with(py, |s| {
            Ok(ingest_zoo(
                s,
                &paths,
                manifest.as_deref(),
                &opts,
                &|ev| match ev {
                    IngestEvent::Discovered { total: n } => {
                        all.store(n, Ordering::SeqCst);
                        progress.emit("ingest", 0, n);
                    }
                    IngestEvent::Processed { .. } => {
                        let done = seen.fetch_add(1, Ordering::SeqCst) + 1;
                        progress.emit("ingest", done, all.load(Ordering::SeqCst));
                    }
                },
            ))
        })?;
        let report = progress.finish(r)?;
        Ok(json(&report.items))
    }

    /// Every task, with its object count: JSON list.
    fn tasks(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |s| {
            let tasks = s.tasks().map_err(to_py)?;
            let counts = s.objects_per_task().map_err(to_py)?;
            let v: Vec<serde_json::Value> = tasks
                .iter()
                .map(|t| {
                    let mut v = serde_json::to_value(t).expect("records serialize");
                    v["objects"] = serde_json::json!(counts.get(&t.name).copied().unwrap_or(0));
                    v
                })
                .collect();
            Ok(json(&v))
        })
    }

    /// Object records, optionally of one task and/or method: JSON list.
    #[pyo3(signature = (task = None, method = None))]
    fn objects(
        &self,
        py: Python<'_>,
        task: Option<String>,
        method: Option<String>,
    ) -> PyResult<String> {
        let method: Option<MethodKind> = method.map(|m| parse("method", &m)).transpose()?;
        self.with(py, |s| {
            let objs = s.objects().map_err(to_py)?;
            let v: Vec<serde_json::Value> = objs
                .iter()
                .filter(|o| task.as_ref().is_none_or(|t| &o.task == t))
                .filter(|o| method.is_none_or(|m| o.method_kind() == m))
                .map(object_json)
                .collect();
            Ok(json(&v))
        })
    }

    /// One object record: JSON.
    fn object(&self, py: Python<'_>, id: ObjectId) -> PyResult<String> {
        self.with(py, |s| {
            Ok(json(&object_json(&s.object(id).map_err(to_py)?)))
        })
    }

    /// An object's embedding of `kind` (`tupate` or `delta-sketch`) as a float32 array (moved, not
    /// copied, into numpy), and its space id.
    #[pyo3(signature = (id, kind = "tupate"))]
    fn embedding<'py>(
        &self,
        py: Python<'py>,
        id: ObjectId,
        kind: &str,
    ) -> PyResult<(Bound<'py, PyArray1<f32>>, String)> {
        let (vec, space) = self.with(py, |s| {
            let rec = s.object(id).map_err(to_py)?;
            let Some(e) = rec.embeddings.iter().find(|e| e.kind.as_str() == kind) else {
                let have: Vec<&str> = rec.embeddings.iter().map(|e| e.kind.as_str()).collect();
                return Err(to_py(peftdb::error::StoreError::NotFound {
                    what: "embedding",
                    key: format!("{kind} of object {id} (it has: {})", have.join(", ")),
                }));
            };
            let v = s.embedding(e.space, id).map_err(to_py)?;
            let v = v.ok_or_else(|| {
                to_py(peftdb::error::StoreError::NotFound {
                    what: "embedding",
                    key: format!("{kind} of object {id}"),
                })
            })?;
            Ok((v, e.space.to_string()))
        })?;
        Ok((PyArray1::from_vec(py, vec), space))
    }

    /// Write an object back as its original adapter folder.
    fn export(&self, py: Python<'_>, id: ObjectId, out: PathBuf) -> PyResult<()> {
        self.with(py, |s| s.export(id, &out).map_err(to_py))
    }

    /// Remove objects; JSON list of the removed records.
    fn remove(&self, py: Python<'_>, ids: Vec<ObjectId>) -> PyResult<String> {
        self.with(py, |s| {
            let gone = s.remove(&ids).map_err(to_py)?;
            Ok(json(&gone.iter().map(object_json).collect::<Vec<_>>()))
        })
    }

    /// Counts, bytes and spaces: JSON.
    fn stats(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |s| Ok(json(&s.stats().map_err(to_py)?)))
    }

    /// The nearest tasks: the same JSON as `peftdb --json nearest`.
    #[pyo3(signature = (task = None, object = None, adapter = None, vector = None, space = None,
        k = 10, similarity = "tupate", method = None, group = None, tags = Vec::new(),
        base_model = None, include_self = false, mode = "auto"))]
    #[allow(clippy::too_many_arguments)]
    fn nearest(
        &self,
        py: Python<'_>,
        task: Option<String>,
        object: Option<ObjectId>,
        adapter: Option<PathBuf>,
        vector: Option<Vec<f32>>,
        space: Option<String>,
        k: usize,
        similarity: &str,
        method: Option<String>,
        group: Option<String>,
        tags: Vec<String>,
        base_model: Option<String>,
        include_self: bool,
        mode: &str,
    ) -> PyResult<String> {
        let given = [
            task.is_some(),
            object.is_some(),
            adapter.is_some(),
            vector.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(invalid(
                "give exactly one of task=, object=, adapter= or vector= (with space=)",
            ));
        }
        let similarity: Similarity = parse("similarity", similarity)?;
        let mode = match mode {
            "auto" => SearchMode::Auto,
            "exact" => SearchMode::Exact,
            "hnsw" => SearchMode::Hnsw,
            other => return Err(invalid(format!("mode {other:?}: one of auto, exact, hnsw"))),
        };
        let mut q = match (task, object, adapter, vector) {
            (Some(t), ..) => Nearest::task(t),
            (_, Some(id), ..) => Nearest::object(id),
            (_, _, Some(dir), _) => Nearest::adapter(dir),
            (.., Some(v)) => {
                let space = space.ok_or_else(|| invalid("vector= needs space= (a space id)"))?;
                Nearest::vector(parse::<SpaceId>("space", &space)?, v)
            }
            _ => unreachable!("exactly one target was checked"),
        };
        q = q.k(k).search_mode(mode).similarity(similarity);
        if let Some(m) = method {
            q = q.method(parse("method", &m)?);
        }
        if let Some(g) = group {
            q = q.group(g);
        }
        for t in tags {
            q = q.tag(t);
        }
        if let Some(b) = base_model {
            q = q.base_model(b);
        }
        if include_self {
            q = q.exclude_query_task(false);
        }
        let config = IndexConfig {
            mode,
            kind: Some(similarity.embedding_kind()),
            ..IndexConfig::one_shot()
        };
        self.with(py, |s| {
            let (index, _) = IndexManager::open(s, config, &|_| {}).map_err(to_py)?;
            Ok(json(&q.run(s, &index).map_err(to_py)?))
        })
    }

    fn __repr__(&self) -> String {
        let state = if self.closed() { ", closed" } else { "" };
        format!("Store({:?}{state})", self.path.display().to_string())
    }
}

/// The answer of `peftdb suggest`: write the initialization (PEFT folder + peftdb_report.json) into
/// `out` and return the report as JSON.
#[pyfunction]
#[pyo3(signature = (store, model, task, out, adapter = None, k = peftdb::suggest::DEFAULT_K,
    shots = 16, seed = 0, indicator = None, tau = peftdb::suggest::DEFAULT_TAU, method = "lora",
    merge = "delta-cat", rank = None, similarity = "delta", noise_z = peftdb::suggest::DEFAULT_NOISE_Z,
    accuracy_guard = peftdb::suggest::DEFAULT_ACCURACY_GUARD, steps = 20, base_model = None,
    label_prior = None, temperature = DEFAULT_TEMPERATURE, progress = None))]
#[allow(clippy::too_many_arguments)]
fn suggest(
    py: Python<'_>,
    store: &Store,
    model: &Model,
    task: &TaskSpec,
    out: PathBuf,
    adapter: Option<PathBuf>,
    k: usize,
    shots: usize,
    seed: u64,
    indicator: Option<String>,
    tau: f64,
    method: &str,
    merge: &str,
    rank: Option<usize>,
    similarity: &str,
    noise_z: f64,
    accuracy_guard: bool,
    steps: usize,
    base_model: Option<String>,
    label_prior: Option<String>,
    temperature: f64,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    peftdb::object::check_output_dir(&out).map_err(to_py)?;
    let similarity: Similarity = parse("similarity", similarity)?;
    let cfg = SuggestConfig {
        method: parse("method", method)?,
        k,
        indicator: match indicator {
            Some(i) => parse("indicator", &i)?,
            None => peftdb::suggest::DEFAULT_INDICATOR,
        },
        tau,
        merge: parse::<peftdb::ensemble::MergeKind>("merge", merge)?.mode(rank),
        similarity,
        shots,
        short_tune_steps: steps,
        seed,
        score: ScoreOptions {
            temperature,
            ..Default::default()
        },
        noise_z,
        accuracy_guard,
        base_model,
        prior: match label_prior {
            Some(p) => parse("label_prior", &p)?,
            None => peftdb::suggest::DEFAULT_PRIOR,
        },
    };
    let adapter: Option<LightweightObject> = match adapter {
        Some(p) => Some(
            py.detach(|| read_adapter(&p, &ReadOptions::default()))
                .map_err(to_py)?,
        ),
        None => None,
    };
    let progress = Progress::new(progress);
    let engine = model.engine.clone();
    let spec = task.task.clone();
    let r = store.with(py, |s| {
        let config = IndexConfig {
            kind: Some(similarity.embedding_kind()),
            ..IndexConfig::one_shot()
        };
        let (index, _) = IndexManager::open(s, config, &|_| {}).map_err(to_py)?;
        let input = peftdb::suggest::SuggestInput {
            store: s,
            index: &index,
            engine: &engine,
            task: &spec,
            adapter,
        };
        let mut stage = "";
        let r = lib_suggest(&input, &cfg, &mut |ev| match ev {
            SuggestEvent::Stage(s) => {
                stage = s;
                progress.emit(s, 0, 1)
            }
            SuggestEvent::TrainStep { step, total } => progress.emit(stage, step, total),
            SuggestEvent::Candidate { done, total } => progress.emit(stage, done, total),
        });
        let written = r.map_err(peftdb::Error::from).and_then(|(obj, report)| {
            write_suggestion(&obj, &report, &out)?;
            Ok(report)
        });
        Ok(written)
    })?;
    // `suggest` has no cancel point: an interrupt (or the callback's exception) takes effect when it
    // returns; the folder it wrote is removed and the exception raised.
    if progress.error.lock().expect("progress lock").is_some() && r.is_ok() {
        let _ = std::fs::remove_dir_all(&out);
    }
    let report = progress.finish(r)?;
    Ok(json(&report))
}

/// Accuracy and loss of an adapter (a folder, a stored object, or none: the bare model) on a task split,
/// by the pipeline's own evaluation; JSON.
#[pyfunction]
#[pyo3(signature = (model, task, adapter = None, store = None, object = None, split = "test",
    batch_size = 32, temperature = DEFAULT_TEMPERATURE, progress = None))]
#[allow(clippy::too_many_arguments)]
fn evaluate(
    py: Python<'_>,
    model: &Model,
    task: &TaskSpec,
    adapter: Option<PathBuf>,
    store: Option<&Store>,
    object: Option<ObjectId>,
    split: &str,
    batch_size: usize,
    temperature: f64,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let split: Split = parse("split", split)?;
    let (obj, source) = match (adapter, store, object) {
        (Some(_), _, Some(_)) => return Err(invalid("give adapter= or object=, not both")),
        (Some(dir), ..) => (
            Some(
                py.detach(|| read_adapter(&dir, &ReadOptions::default()))
                    .map_err(to_py)?,
            ),
            dir.display().to_string(),
        ),
        (None, Some(s), Some(id)) => (
            Some(s.with(py, |s| s.get(id).map(|g| g.1).map_err(to_py))?),
            format!("object {id}"),
        ),
        (None, None, Some(_)) => return Err(invalid("object= needs store=")),
        (None, _, None) => (None, "base model".to_string()),
    };
    let t = task.task.clone();
    let engine = model.engine.clone();
    let progress = Progress::new(progress);
    let opts = ScoreOptions {
        temperature,
        batch_size: batch_size.max(1),
    };
    let r = py.detach(|| {
        peftdb::transfer::evaluate(
            &engine,
            &t,
            obj.as_ref(),
            t.split(split),
            &opts,
            &mut |done, total| progress.emit("evaluate", done, total),
        )
    });
    let ev = progress.finish(r)?;
    Ok(json(&peftdb::transfer::EvalReport::new(
        &t,
        split,
        source,
        &ev,
        temperature,
    )))
}

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Store>()?;
    m.add_class::<Model>()?;
    m.add_class::<TaskSpec>()?;
    m.add_function(wrap_pyfunction!(suggest, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add("SCHEMA_VERSION", peftdb::store::SCHEMA_VERSION)?;
    m.add("VERSION", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
