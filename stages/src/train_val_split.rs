//! Kind `train_val_split`: a deterministic shuffle, then the last
//! `floor(n * val_ratio)` rows are validation. Both outputs share one schema,
//! inferred from every row, so Parquet readers see identical columns.
//!
//! Rows are spilled once to the scratch directory with their offsets; only the
//! offsets are held in memory while the shuffled outputs are written.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;

use anyhow::Context;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::params::{self, OnError};
use crate::rng::SplitMix64;
use crate::rows::{Format, RowReader, RowWriter, infer_schema};
use crate::{ConfigError, KeySpec, Stage, StageContext};

/// The `train_val_split` kind.
pub struct TrainValSplit;

/// Params of `train_val_split`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Share of rows for validation, 0 < r < 1.
    #[serde(default = "default_ratio")]
    pub val_ratio: f64,
    /// Shuffle seed.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `fail` (default) or `skip` on a malformed row.
    #[serde(default)]
    pub on_error: OnError,
}

impl params::Validate for Params {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.val_ratio > 0.0 && self.val_ratio < 1.0 {
            Ok(())
        } else {
            Err(ConfigError {
                key: "params.val_ratio".into(),
                message: format!(
                    "val_ratio must be between 0 and 1 (exclusive), got {}",
                    self.val_ratio
                ),
            })
        }
    }
}

fn default_ratio() -> f64 {
    0.1
}
fn default_seed() -> u64 {
    42
}

/// The shuffled order of `n` rows for `seed` (Fisher-Yates).
pub fn permutation(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = SplitMix64(seed);
    let mut p: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// How many of `n` rows go to validation.
pub fn val_count(n: usize, ratio: f64) -> usize {
    ((n as f64) * ratio).floor() as usize
}

const INPUTS: &[KeySpec] = &[KeySpec {
    name: "data",
    required: true,
    doc: "rows to split (.jsonl or .parquet)",
}];
const OUTPUTS: &[KeySpec] = &[
    KeySpec {
        name: "train",
        required: true,
        doc: "training rows (.parquet or .jsonl)",
    },
    KeySpec {
        name: "val",
        required: true,
        doc: "validation rows (.parquet or .jsonl)",
    },
    KeySpec {
        name: "train_jsonl",
        required: false,
        doc: "the training rows again, as JSONL",
    },
    KeySpec {
        name: "val_jsonl",
        required: false,
        doc: "the validation rows again, as JSONL",
    },
];

impl Stage for TrainValSplit {
    fn kind(&self) -> &'static str {
        "train_val_split"
    }

    fn version(&self) -> u32 {
        1
    }

    fn inputs(&self) -> &'static [KeySpec] {
        INPUTS
    }

    fn outputs(&self) -> &'static [KeySpec] {
        OUTPUTS
    }

    fn check(&self, _config: &BTreeMap<String, Value>, params: &Value) -> Vec<ConfigError> {
        params::check::<Params>(params)
    }

    fn run(&self, ctx: &StageContext) -> anyhow::Result<()> {
        let p: Params = params::for_run(&ctx.params)?;
        let input = ctx.input("data")?;
        std::fs::create_dir_all(&ctx.scratch)?;
        let spill_path = ctx.scratch.join("rows.jsonl");
        let mut spill = BufWriter::with_capacity(
            1 << 20,
            File::create(&spill_path).context("creating the spill file")?,
        );
        let mut offsets: Vec<(u64, u32)> = Vec::new();
        let mut pos = 0u64;
        let mut skipped = 0u64;
        let mut reader = RowReader::open(&input)?;
        ctx.progress.set_total(reader.len());
        let mut buf = Vec::new();
        while let Some(row) = reader.next_row() {
            let (_, row) = match row {
                Ok(r) => r,
                Err(e) if p.on_error == OnError::Skip => {
                    tracing::warn!("{e}");
                    skipped += 1;
                    continue;
                }
                Err(e) => return Err(e).context("set `on_error: skip` to leave such records out"),
            };
            buf.clear();
            serde_json::to_writer(&mut buf, &row)?;
            let len = u32::try_from(buf.len()).context("a row is larger than 4 GiB")?;
            spill.write_all(&buf)?;
            spill.write_all(b"\n")?;
            offsets.push((pos, len));
            pos += buf.len() as u64 + 1;
            if offsets.len().is_multiple_of(4096) {
                ctx.progress.set_done(reader.bytes_read());
            }
        }
        spill.flush()?;
        drop(spill);
        let n = offsets.len();
        anyhow::ensure!(n > 0, "{} has no rows to split", input.display());
        anyhow::ensure!(n <= u32::MAX as usize, "more than 2^32 rows");
        let v = val_count(n, p.val_ratio);
        anyhow::ensure!(
            v > 0 && v < n,
            "val_ratio {} of {n} rows leaves an empty {} set; change val_ratio or add rows",
            p.val_ratio,
            if v == 0 { "validation" } else { "training" }
        );
        let order = permutation(n, p.seed);
        let (train, val) = order.split_at(n - v);
        let needs_schema = ["train", "val", "train_jsonl", "val_jsonl"]
            .iter()
            .filter_map(|o| ctx.output(o))
            .any(|o| Format::of(&o) == Format::Parquet);
        let schema = if needs_schema {
            Some(infer_schema(&spill_path)?)
        } else {
            None
        };
        let rows = File::open(&spill_path)?;
        let mut report = json!({"rows_in": n as u64 + skipped, "skipped": skipped, "seed": p.seed, "val_ratio": p.val_ratio});
        for (out, idx) in [
            ("train", train),
            ("val", val),
            ("train_jsonl", train),
            ("val_jsonl", val),
        ] {
            let Some(path) = ctx.output(out) else {
                continue;
            };
            let schema = (Format::of(&path) == Format::Parquet)
                .then(|| schema.clone())
                .flatten();
            let mut w = RowWriter::create(&path, schema)?;
            for &i in idx {
                let (off, len) = offsets[i as usize];
                buf.resize(len as usize, 0);
                rows.read_exact_at(&mut buf, off)
                    .context("reading the spill file")?;
                w.write_raw_json(&buf)?;
            }
            report[format!("{out}_rows")] = json!(w.finish()?);
        }
        let _ = std::fs::remove_file(&spill_path);
        ctx.report(&report);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_a_deterministic_permutation() {
        let a = permutation(1000, 42);
        assert_eq!(a, permutation(1000, 42));
        assert_ne!(a, permutation(1000, 43));
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, (0..1000).collect::<Vec<u32>>());
        // Pinned to an independent Python implementation of SplitMix64 + Lemire +
        // Fisher-Yates: a seed must mean the same split on every machine and version.
        assert_eq!(
            &permutation(10, 42)[..],
            &[8, 3, 6, 5, 4, 0, 9, 2, 1, 7][..]
        );
        assert_eq!(val_count(10, 0.1), 1);
        assert_eq!(val_count(19, 0.1), 1);
        assert_eq!(val_count(20, 0.1), 2);
    }
}
