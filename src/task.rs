//! Task data: a folder with `task.json` (schema/task.schema.json) and `train.jsonl`, `dev.jsonl`,
//! `test.jsonl` (one `{"text": ..., "label": ...}` per line), and seeded k-shot sampling.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Loading task data (task.json + JSONL splits).
#[derive(Debug, Error)]
pub enum TaskError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: missing; a task folder holds task.json and train.jsonl, dev.jsonl, test.jsonl"
    )]
    MissingFile { path: PathBuf },
    #[error("{path}: invalid task.json: {reason} (see schema/task.schema.json)")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: label {label:?} has no verbalizer text; give labels[].text a non-empty string (the text the label is scored by)")]
    NoVerbalizer { path: PathBuf, label: String },
    #[error("{path}:{line}: {reason}; each line must be {{\"text\": string, \"label\": one of the task's labels}}")]
    BadLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}:{line}: unknown label {label:?}; task.json declares {known:?}")]
    UnknownLabel {
        path: PathBuf,
        line: usize,
        label: String,
        known: Vec<String>,
    },
    #[error("{path}: the split is empty; every split needs at least one example")]
    EmptySplit { path: PathBuf },
    #[error("few-shot sampling: {0}")]
    Sampling(String),
}

impl TaskError {
    /// [`crate::error::ErrorKind::Io`] for an unreadable file, else `InvalidTask`.
    pub fn kind(&self) -> crate::error::ErrorKind {
        match self {
            TaskError::Io { .. } => crate::error::ErrorKind::Io,
            _ => crate::error::ErrorKind::InvalidTask,
        }
    }
}

/// A label: its id as it appears in the data, and the verbalizer text it is scored by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub id: String,
    pub text: String,
}

/// One example: text and label index (into [`Task::labels`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub text: String,
    pub label: usize,
}

/// Which split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Dev,
    Test,
}

impl Split {
    pub fn file_name(self) -> &'static str {
        match self {
            Split::Train => "train.jsonl",
            Split::Dev => "dev.jsonl",
            Split::Test => "test.jsonl",
        }
    }
    /// `train`, `dev` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Dev => "dev",
            Split::Test => "test",
        }
    }
    pub fn parse(s: &str) -> Option<Split> {
        match s {
            "train" => Some(Split::Train),
            "dev" | "validation" => Some(Split::Dev),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Split::parse(s).ok_or_else(|| format!("unknown split {s:?}; one of train, dev, test"))
    }
}

/// A loaded task.
#[derive(Debug, Clone)]
pub struct Task {
    pub dir: PathBuf,
    pub name: String,
    pub group: Option<String>,
    pub description: Option<String>,
    pub labels: Vec<Label>,
    pub train: Vec<Example>,
    pub dev: Vec<Example>,
    pub test: Vec<Example>,
}

fn label_key(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Task {
    /// Load a task folder; every split must exist and be non-empty, every label known.
    pub fn load(dir: &Path) -> Result<Task, TaskError> {
        let cfg_path = dir.join("task.json");
        let (name, group, description, labels) = read_task_json(&cfg_path)?;
        let read = |split: Split| read_split(&dir.join(split.file_name()), &labels);
        Ok(Task {
            dir: dir.to_path_buf(),
            name,
            group,
            description,
            train: read(Split::Train)?,
            dev: read(Split::Dev)?,
            test: read(Split::Test)?,
            labels,
        })
    }

    /// A task given as data rather than a folder (the Python bindings' `TaskData`): the same checks as
    /// [`Task::load`] (at least 2 labels with unique ids and non-empty verbalizers, every example's label
    /// declared, train and dev non-empty); `test` may be empty. `labels` are `(id, verbalizer)` pairs and
    /// examples `(text, label id)`; errors name `origin` and the split, with 1-based example numbers.
    pub fn from_examples(
        origin: &Path,
        name: &str,
        group: Option<String>,
        labels: Vec<(String, String)>,
        splits: [Vec<(String, String)>; 3],
    ) -> Result<Task, TaskError> {
        if name.trim().is_empty() {
            return Err(TaskError::Config {
                path: origin.to_path_buf(),
                reason: "name must be a non-empty string".into(),
            });
        }
        let labels = check_labels(origin, labels)?;
        let [train, dev, test] = splits;
        let convert = |split: Split, rows: Vec<(String, String)>| {
            let path = origin.join(split.file_name());
            if rows.is_empty() && split != Split::Test {
                return Err(TaskError::EmptySplit { path });
            }
            rows.into_iter()
                .enumerate()
                .map(|(i, (text, key))| {
                    Ok(Example {
                        label: label_index(&path, i + 1, &key, &labels)?,
                        text,
                    })
                })
                .collect::<Result<Vec<_>, TaskError>>()
        };
        Ok(Task {
            dir: origin.to_path_buf(),
            name: name.to_string(),
            group,
            description: None,
            train: convert(Split::Train, train)?,
            dev: convert(Split::Dev, dev)?,
            test: convert(Split::Test, test)?,
            labels,
        })
    }

    /// The verbalizer texts, in label order.
    pub fn label_texts(&self) -> Vec<String> {
        self.labels.iter().map(|l| l.text.clone()).collect()
    }

    pub fn split(&self, split: Split) -> &[Example] {
        match split {
            Split::Train => &self.train,
            Split::Dev => &self.dev,
            Split::Test => &self.test,
        }
    }

    /// Accuracy of always predicting the most frequent test label (the "chance" baseline).
    pub fn majority_rate(&self, split: Split) -> f64 {
        let ex = self.split(split);
        let mut counts = vec![0usize; self.labels.len()];
        for e in ex {
            counts[e.label] += 1;
        }
        counts.into_iter().max().unwrap_or(0) as f64 / ex.len().max(1) as f64
    }
}

type TaskHeader = (String, Option<String>, Option<String>, Vec<Label>);

fn read_task_json(path: &Path) -> Result<TaskHeader, TaskError> {
    if !path.is_file() {
        return Err(TaskError::MissingFile {
            path: path.to_path_buf(),
        });
    }
    let bytes = std::fs::read(path).map_err(|source| TaskError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let cfg_err = |reason: String| TaskError::Config {
        path: path.to_path_buf(),
        reason,
    };
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| cfg_err(format!("not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| cfg_err("the top level must be an object".into()))?;
    let name = obj
        .get("name")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| cfg_err("name must be a non-empty string".into()))?
        .to_string();
    let opt_str = |k: &str| obj.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let arr = obj
        .get("labels")
        .and_then(|v| v.as_array())
        .ok_or_else(|| cfg_err("labels must be an array of {id, text}".into()))?;
    let mut pairs = Vec::with_capacity(arr.len());
    for (i, l) in arr.iter().enumerate() {
        let id = l
            .get("id")
            .and_then(label_key)
            .ok_or_else(|| cfg_err(format!("labels[{i}].id must be a string or number")))?;
        let text = l.get("text").and_then(|v| v.as_str()).unwrap_or_default();
        pairs.push((id, text.to_string()));
    }
    let labels = check_labels(path, pairs)?;
    Ok((name, opt_str("group"), opt_str("description"), labels))
}

/// The label rules of task.json: at least 2 labels, unique ids, a non-empty verbalizer each.
fn check_labels(path: &Path, pairs: Vec<(String, String)>) -> Result<Vec<Label>, TaskError> {
    let cfg_err = |reason: String| TaskError::Config {
        path: path.to_path_buf(),
        reason,
    };
    if pairs.len() < 2 {
        return Err(cfg_err(format!(
            "a classification task needs at least 2 labels, found {}",
            pairs.len()
        )));
    }
    let mut labels: Vec<Label> = Vec::with_capacity(pairs.len());
    for (id, text) in pairs {
        let text = text.trim();
        if text.is_empty() {
            return Err(TaskError::NoVerbalizer {
                path: path.to_path_buf(),
                label: id,
            });
        }
        if labels.iter().any(|x| x.id == id) {
            return Err(cfg_err(format!("label id {id:?} appears twice")));
        }
        labels.push(Label {
            id,
            text: text.to_string(),
        });
    }
    Ok(labels)
}

/// The label index of `key`, or the error naming the line and the known labels.
fn label_index(path: &Path, line: usize, key: &str, labels: &[Label]) -> Result<usize, TaskError> {
    labels
        .iter()
        .position(|l| l.id == key)
        .ok_or_else(|| TaskError::UnknownLabel {
            path: path.to_path_buf(),
            line,
            label: key.to_string(),
            known: labels.iter().map(|l| l.id.clone()).collect(),
        })
}

fn read_split(path: &Path, labels: &[Label]) -> Result<Vec<Example>, TaskError> {
    if !path.is_file() {
        return Err(TaskError::MissingFile {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| TaskError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| TaskError::BadLine {
            path: path.to_path_buf(),
            line: line_no,
            reason,
        };
        let v: Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let t = v
            .get("text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| bad("no string \"text\"".into()))?;
        let key = v
            .get("label")
            .and_then(label_key)
            .ok_or_else(|| bad("no \"label\"".into()))?;
        let label = label_index(path, line_no, &key, labels)?;
        out.push(Example {
            text: t.to_string(),
            label,
        });
    }
    if out.is_empty() {
        return Err(TaskError::EmptySplit {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// Fisher-Yates shuffle with a seeded ChaCha8 stream (the same seed gives the same order everywhere).
pub fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        let j = rng.random_range(0..=i);
        items.swap(i, j);
    }
}

/// k examples per class, drawn without replacement with `seed`, in a seeded shuffled order. A class with
/// fewer than k examples contributes all of them; a class with none is an error.
pub fn few_shot(
    examples: &[Example],
    num_labels: usize,
    k: usize,
    seed: u64,
) -> Result<Vec<Example>, TaskError> {
    Ok(few_shot_indices(examples, num_labels, k, seed)?
        .into_iter()
        .map(|i| examples[i].clone())
        .collect())
}

/// The positions in `examples` of what [`few_shot`] draws with the same arguments, in its order.
pub fn few_shot_indices(
    examples: &[Example],
    num_labels: usize,
    k: usize,
    seed: u64,
) -> Result<Vec<usize>, TaskError> {
    if k == 0 {
        return Err(TaskError::Sampling("k must be at least 1".into()));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(k * num_labels);
    for c in 0..num_labels {
        let mut idx: Vec<usize> = (0..examples.len())
            .filter(|&i| examples[i].label == c)
            .collect();
        if idx.is_empty() {
            return Err(TaskError::Sampling(format!(
                "label {c} has no example to sample"
            )));
        }
        shuffle(&mut idx, &mut rng);
        out.extend(idx.into_iter().take(k));
    }
    shuffle(&mut out, &mut rng);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) {
        std::fs::write(dir.join(name), body).expect("write");
    }

    fn task_dir(labels: &str, train: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        write(
            d.path(),
            "task.json",
            &format!(r#"{{"name":"t","group":"g","labels":{labels}}}"#),
        );
        write(d.path(), "train.jsonl", train);
        write(d.path(), "dev.jsonl", "{\"text\":\"a\",\"label\":\"x\"}\n");
        write(d.path(), "test.jsonl", "{\"text\":\"b\",\"label\":\"y\"}\n");
        d
    }

    const LABELS: &str = r#"[{"id":"x","text":"ex"},{"id":"y","text":"why"}]"#;

    #[test]
    fn loads_a_small_task() {
        let d = task_dir(
            LABELS,
            "{\"text\":\"a\",\"label\":\"x\"}\n{\"text\":\"b\",\"label\":\"y\"}\n",
        );
        let t = Task::load(d.path()).expect("loads");
        assert_eq!(t.labels.len(), 2);
        assert_eq!(t.train[1].label, 1);
        assert_eq!(t.label_texts(), vec!["ex", "why"]);
    }

    #[test]
    fn unknown_label_names_file_line_and_label() {
        let d = task_dir(
            LABELS,
            "{\"text\":\"a\",\"label\":\"x\"}\n{\"text\":\"b\",\"label\":\"z\"}\n",
        );
        let e = Task::load(d.path()).expect_err("unknown label");
        let m = e.to_string();
        assert!(matches!(e, TaskError::UnknownLabel { line: 2, .. }), "{m}");
        assert!(m.contains("train.jsonl:2") && m.contains("\"z\""), "{m}");
    }

    #[test]
    fn empty_split_and_missing_verbalizer_are_errors() {
        let d = task_dir(LABELS, "\n");
        assert!(matches!(
            Task::load(d.path()),
            Err(TaskError::EmptySplit { .. })
        ));
        let d = task_dir(
            r#"[{"id":"x","text":""},{"id":"y","text":"why"}]"#,
            "{\"text\":\"a\",\"label\":\"x\"}\n",
        );
        let e = Task::load(d.path()).expect_err("no verbalizer");
        assert!(
            matches!(e, TaskError::NoVerbalizer { ref label, .. } if label == "x"),
            "{e}"
        );
    }

    #[test]
    fn a_task_from_examples_equals_the_folder_and_is_checked_alike() {
        let d = task_dir(
            LABELS,
            "{\"text\":\"a\",\"label\":\"x\"}\n{\"text\":\"b\",\"label\":\"y\"}\n",
        );
        let loaded = Task::load(d.path()).expect("loads");
        let pair = |t: &str, l: &str| (t.to_string(), l.to_string());
        let labels = vec![pair("x", "ex"), pair("y", "why")];
        let splits = || {
            [
                vec![pair("a", "x"), pair("b", "y")],
                vec![pair("a", "x")],
                vec![pair("b", "y")],
            ]
        };
        let built = Task::from_examples(d.path(), "t", Some("g".into()), labels.clone(), splits())
            .expect("builds");
        assert_eq!(built.labels, loaded.labels);
        assert_eq!(
            (&built.train, &built.dev, &built.test),
            (&loaded.train, &loaded.dev, &loaded.test)
        );
        // No test split is allowed (a few examples to suggest from); no dev split is not.
        let [train, dev, _] = splits();
        let t = Task::from_examples(
            d.path(),
            "t",
            None,
            labels.clone(),
            [train.clone(), dev, vec![]],
        );
        assert!(t.expect("no test split").test.is_empty());
        let e = Task::from_examples(
            d.path(),
            "t",
            None,
            labels.clone(),
            [train.clone(), vec![], vec![]],
        );
        assert!(matches!(e, Err(TaskError::EmptySplit { .. })));
        let e = Task::from_examples(
            d.path(),
            "t",
            None,
            labels,
            [vec![pair("c", "z")], vec![], vec![]],
        )
        .expect_err("unknown label");
        assert!(
            e.to_string().contains("train.jsonl:1") && e.to_string().contains("\"z\""),
            "{e}"
        );
        let e = Task::from_examples(
            d.path(),
            "t",
            None,
            vec![pair("x", " "), pair("y", "why")],
            [train, vec![], vec![]],
        )
        .expect_err("empty verbalizer");
        assert!(matches!(e, TaskError::NoVerbalizer { .. }), "{e}");
    }

    #[test]
    fn few_shot_is_seeded_and_balanced() {
        let ex: Vec<Example> = (0..50)
            .map(|i| Example {
                text: format!("t{i}"),
                label: i % 3,
            })
            .collect();
        let a = few_shot(&ex, 3, 4, 7).expect("sample");
        let b = few_shot(&ex, 3, 4, 7).expect("sample");
        let c = few_shot(&ex, 3, 4, 8).expect("sample");
        assert_eq!(a, b);
        assert_ne!(a, c);
        for l in 0..3 {
            assert_eq!(a.iter().filter(|e| e.label == l).count(), 4);
        }
    }
}
