//! The results file: one JSON record per finished run, appended and synced as each run ends, so an
//! interrupted experiment resumes where it stopped and another task folder extends it without redoing
//! finished runs.
//!
//! Every record carries a `key` made of its phase, its task(s), its seed and the hash of the protocol
//! settings it was run with ([`super::ExperimentConfig::protocol_hash`]); a record whose protocol differs
//! from the current configuration is kept in the file but not reused. A last line cut short by a killed
//! process is ignored (and overwritten by the next append); any other unreadable line is an error naming
//! the file and the line.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Errors of the results file.
#[derive(Debug, Error)]
pub enum ResultsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a results record ({detail}); fix or remove that line")]
    BadLine {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    #[error("record {key}: its data is not a {phase} record ({source}); remove that line from the results file and re-run to compute it again")]
    BadData {
        key: String,
        phase: String,
        #[source]
        source: serde_json::Error,
    },
}

/// One finished run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Unique per run and protocol: `phase/task/init/seed@protocol`.
    pub key: String,
    /// `zoo`, `limited`, `indicators` or `textemb`.
    pub phase: String,
    pub task: String,
    /// What the run started from (`scratch`, `source:NAME`, `average`, `manual`, `ensemble:INDICATOR`),
    /// or the zoo method.
    #[serde(default)]
    pub init: String,
    #[serde(default)]
    pub seed: u64,
    /// Protocol hash of the settings the run used.
    pub protocol: String,
    /// Wall-clock seconds of the run.
    #[serde(default)]
    pub seconds: f64,
    /// The phase's numbers (accuracies, scores, vectors...).
    #[serde(default)]
    pub data: Value,
}

impl Record {
    pub fn make_key(phase: &str, task: &str, init: &str, seed: u64, protocol: &str) -> String {
        format!("{phase}/{task}/{init}/{seed}@{protocol}")
    }

    /// The record's data as its phase's type (`super::records`): a missing or mistyped field is an
    /// error naming the record.
    pub fn data_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, ResultsError> {
        T::deserialize(&self.data).map_err(|source| ResultsError::BadData {
            key: self.key.clone(),
            phase: self.phase.clone(),
            source,
        })
    }
}

/// The results file, loaded.
#[derive(Debug)]
pub struct ResultsFile {
    path: PathBuf,
    file: File,
    records: BTreeMap<String, Record>,
    /// Lines skipped as cut short by a crash.
    pub torn_tail: bool,
}

impl ResultsFile {
    /// Open (creating it if missing) and read every record.
    pub fn open(path: &Path) -> Result<ResultsFile, ResultsError> {
        let ioe = |source| ResultsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(ioe)?;
        let mut records = BTreeMap::new();
        let mut good_len = 0u64;
        let mut torn_tail = false;
        {
            let mut reader = BufReader::new(&file);
            let mut buf = Vec::new();
            let mut line_no = 0;
            loop {
                buf.clear();
                let n = reader.read_until(b'\n', &mut buf).map_err(ioe)?;
                if n == 0 {
                    break;
                }
                line_no += 1;
                let complete = buf.last() == Some(&b'\n');
                let text = String::from_utf8_lossy(&buf);
                let text = text.trim();
                if text.is_empty() {
                    good_len += n as u64;
                    continue;
                }
                match serde_json::from_str::<Record>(text) {
                    Ok(r) if complete => {
                        good_len += n as u64;
                        records.insert(r.key.clone(), r);
                    }
                    // The last line, without its newline: a write cut short.
                    _ if !complete => {
                        torn_tail = true;
                        break;
                    }
                    Ok(_) => unreachable!(),
                    Err(e) => {
                        return Err(ResultsError::BadLine {
                            path: path.to_path_buf(),
                            line: line_no,
                            detail: e.to_string(),
                        })
                    }
                }
            }
        }
        if torn_tail {
            file.set_len(good_len).map_err(ioe)?;
        }
        file.seek(SeekFrom::End(0)).map_err(ioe)?;
        Ok(ResultsFile {
            path: path.to_path_buf(),
            file,
            records,
            torn_tail,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Record> {
        self.records.get(key)
    }

    /// Every record, by key.
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.records.values()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Append a record and sync it to disk before returning.
    pub fn append(&mut self, record: Record) -> Result<(), ResultsError> {
        let ioe = |source| ResultsError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(&record).map_err(|e| ioe(std::io::Error::other(e)))?;
        line.push(b'\n');
        self.file.write_all(&line).map_err(ioe)?;
        self.file.sync_data().map_err(ioe)?;
        self.records.insert(record.key.clone(), record);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str) -> Record {
        Record {
            key: key.into(),
            phase: "limited".into(),
            task: "t".into(),
            init: "scratch".into(),
            seed: 1,
            protocol: "p".into(),
            seconds: 0.5,
            data: serde_json::json!({"test_accuracy": 0.5}),
        }
    }

    #[test]
    fn appends_survive_reopen_and_a_torn_tail_is_dropped() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("results.jsonl");
        let mut r = ResultsFile::open(&p).expect("open");
        r.append(rec("a")).expect("append");
        r.append(rec("b")).expect("append");
        drop(r);
        // A crash in the middle of the third line.
        let mut f = OpenOptions::new().append(true).open(&p).expect("open");
        f.write_all(br#"{"key":"c","pha"#).expect("write");
        drop(f);
        let mut r = ResultsFile::open(&p).expect("reopen");
        assert!(r.torn_tail);
        assert_eq!(r.len(), 2);
        assert_eq!(r.get("b"), Some(&rec("b")));
        r.append(rec("c")).expect("append after torn tail");
        drop(r);
        let r = ResultsFile::open(&p).expect("reopen");
        assert!(!r.torn_tail);
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn a_bad_line_in_the_middle_names_file_and_line() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("results.jsonl");
        let good = serde_json::to_string(&rec("a")).expect("json");
        std::fs::write(&p, format!("{good}\nnot json\n{good}\n")).expect("write");
        let e = ResultsFile::open(&p).expect_err("bad line");
        let m = e.to_string();
        assert!(m.contains("results.jsonl:2"), "{m}");
    }
}
