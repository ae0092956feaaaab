//! Output files for data stages: JSONL written as it comes, Parquet through a
//! JSONL spill file so its schema can be inferred from every row first.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::rows::{Format, RowReader, RowWriter, infer_schema};

/// Writes `v` to `path` as pretty JSON with a final newline, creating the
/// parent directory if needed.
pub fn write_json(path: &Path, v: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// Where a stage writes one of its outputs.
pub struct Sink {
    path: PathBuf,
    /// JSONL being written: the output itself, or the spill file for Parquet.
    file: BufWriter<File>,
    spill: Option<PathBuf>,
    rows: u64,
}

impl Sink {
    /// Creates the output at `path` (format from its extension). A Parquet output
    /// spills to a JSONL file in `scratch` until [`Sink::finish`].
    pub fn create(path: &Path, scratch: &Path) -> anyhow::Result<Sink> {
        let (target, spill) = match Format::of(path) {
            Format::Jsonl => (path.to_path_buf(), None),
            Format::Parquet => {
                std::fs::create_dir_all(scratch)
                    .with_context(|| format!("creating {}", scratch.display()))?;
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let tmp = scratch.join(format!("{name}.spill.jsonl"));
                (tmp.clone(), Some(tmp))
            }
        };
        let file =
            File::create(&target).with_context(|| format!("cannot create {}", target.display()))?;
        Ok(Sink {
            path: path.to_path_buf(),
            file: BufWriter::with_capacity(1 << 20, file),
            spill,
            rows: 0,
        })
    }

    /// Writes one row.
    pub fn write<T: serde::Serialize>(&mut self, row: &T) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.file, row)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.file
            .write_all(b"\n")
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.rows += 1;
        Ok(())
    }

    /// Appends `rows` complete JSON lines, each ending in `\n`.
    pub fn write_lines(&mut self, bytes: &[u8], rows: u64) -> anyhow::Result<()> {
        self.file
            .write_all(bytes)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.rows += rows;
        Ok(())
    }

    /// Completes the file; returns the number of rows.
    pub fn finish(self) -> anyhow::Result<u64> {
        let Sink {
            path,
            file,
            spill,
            rows,
        } = self;
        // No fsync: the engine commits outputs after the stage exits, and forcing
        // gigabytes to disk here would only make the stage wait for the device.
        file.into_inner()
            .map_err(|e| anyhow::anyhow!("writing {}: {}", path.display(), e.error()))?;
        let Some(tmp) = spill else { return Ok(rows) };
        let schema = infer_schema(&tmp)?;
        let mut w = RowWriter::create(&path, Some(schema))?;
        let mut r = RowReader::open(&tmp)?;
        while let Some(row) = r.next_row() {
            let (_, v) = row?;
            w.write(&v)?;
        }
        let n = w.finish()?;
        let _ = std::fs::remove_file(&tmp);
        Ok(n)
    }
}
