//! Run records: which key produced which outputs.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::store::{OutputRef, Store, check_key};

/// One successful run of a stage: its key and what it produced. Records are never
/// overwritten by another key; there is one file per key: `records/<key>.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// The cache key the run was stored under.
    pub key: String,
    /// Name of the stage.
    pub stage: String,
    /// Kind of the stage (what sort of work it does).
    pub kind: String,
    /// When the run finished, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// How long the run took.
    pub duration_ms: u64,
    /// Outputs by name.
    pub outputs: BTreeMap<String, RecordOutput>,
    /// What the key was computed from (canonical, secrets redacted) so a later plan
    /// can say what changed.
    pub inputs: serde_json::Value,
    /// What the stage reported about its work (rows in and out, skipped...), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
}

/// One output of a run: where it is declared and what it contains.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordOutput {
    /// Declared path, relative to the pipeline directory.
    pub path: String,
    /// The committed content.
    #[serde(flatten)]
    pub output: OutputRef,
}

impl Store {
    fn record_path(&self, key: &str) -> PathBuf {
        self.root().join("records").join(format!("{key}.json"))
    }

    /// Write the record for `r.key` atomically (replacing an earlier record for the
    /// same key).
    pub fn write_record(&self, r: &Record) -> Result<()> {
        check_key(&r.key)?;
        let path = self.record_path(&r.key);
        let mut bytes = serde_json::to_vec_pretty(r)
            .map_err(|e| Error::Other(format!("{}: cannot encode record: {e}", path.display())))?;
        bytes.push(b'\n');
        crate::write_atomic(&path, &bytes)
    }

    /// Read the record for `key`: `Ok(None)` if there is none, [`Error::Corrupt`] if
    /// it cannot be parsed or belongs to another key.
    pub fn read_record(&self, key: &str) -> Result<Option<Record>> {
        check_key(key)?;
        let path = self.record_path(key);
        match fs::read(&path) {
            Ok(bytes) => parse_record(&path, &bytes, Some(key)).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// All records, sorted by creation time then key. Corrupt ones are skipped with
    /// a warning.
    pub fn records(&self) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        for (_, parsed) in self.record_files()? {
            match parsed {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!("skipping record: {e}"),
            }
        }
        out.sort_by(|a, b| (a.created_unix_ms, &a.key).cmp(&(b.created_unix_ms, &b.key)));
        Ok(out)
    }

    /// Every `records/*.json` file with its parse result (for gc, which also removes
    /// corrupt ones).
    pub(crate) fn record_files(&self) -> Result<Vec<(PathBuf, Result<Record>)>> {
        let dir = self.root().join("records");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).at(&dir)? {
            let entry = entry.at(&dir)?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            // Skips temporaries of write_atomic (".<name>.anneal-tmp-...").
            let Some(key) = name
                .strip_suffix(".json")
                .filter(|_| !name.starts_with('.'))
            else {
                continue;
            };
            let parsed = fs::read(&path)
                .at(&path)
                .and_then(|bytes| parse_record(&path, &bytes, Some(key)));
            out.push((path, parsed));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

fn parse_record(path: &Path, bytes: &[u8], key: Option<&str>) -> Result<Record> {
    let corrupt = |detail: String| Error::Corrupt {
        path: path.to_path_buf(),
        what: "record",
        detail,
    };
    let r: Record = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if let Some(key) = key
        && r.key != key
    {
        return Err(corrupt(format!("it is for key {:?}", r.key)));
    }
    Ok(r)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::digest::{Digest, EntryKind};

    pub(crate) fn record(key: &str, outputs: &[(&str, OutputRef)]) -> Record {
        Record {
            key: key.into(),
            stage: "train".into(),
            kind: "sft".into(),
            created_unix_ms: 1_700_000_000_000,
            duration_ms: 42,
            outputs: outputs
                .iter()
                .map(|(name, o)| {
                    let out = RecordOutput {
                        path: format!("out/{name}"),
                        output: o.clone(),
                    };
                    (name.to_string(), out)
                })
                .collect(),
            inputs: serde_json::json!({"lr": 0.0001, "token": "<redacted>"}),
            report: None,
        }
    }

    #[test]
    fn write_then_read() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        assert!(store.read_record("k1").unwrap().is_none());
        let out = OutputRef {
            kind: EntryKind::Dir,
            digest: Digest::of_bytes(b"m"),
            size: 7,
        };
        let r = record("k1", &[("model", out.clone())]);
        store.write_record(&r).unwrap();
        let back = store.read_record("k1").unwrap().unwrap();
        assert_eq!(back.key, "k1");
        assert_eq!(back.outputs["model"].output, out);
        assert_eq!(back.outputs["model"].path, "out/model");
        assert_eq!(back.inputs, r.inputs);
        // The output reference is flattened next to the path.
        let text = fs::read_to_string(tmp.path().join("records/k1.json")).unwrap();
        assert!(text.contains("\"kind\": \"dir\""), "{text}");
        assert_eq!(store.records().unwrap().len(), 1);
    }

    #[test]
    fn corrupt_records() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        store.write_record(&record("good", &[])).unwrap();
        fs::write(tmp.path().join("records/bad.json"), "{").unwrap();
        let err = store.read_record("bad").unwrap_err();
        assert!(
            matches!(err, Error::Corrupt { what: "record", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("bad.json"));
        // A record stored under the wrong file name is corrupt too.
        fs::copy(
            tmp.path().join("records/good.json"),
            tmp.path().join("records/other.json"),
        )
        .unwrap();
        assert!(store.read_record("other").is_err());
        let keys: Vec<_> = store
            .records()
            .unwrap()
            .into_iter()
            .map(|r| r.key)
            .collect();
        assert_eq!(keys, ["good"]);
        assert!(store.read_record("../x").is_err());
    }
}
