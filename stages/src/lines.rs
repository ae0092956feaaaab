//! Parallel, order-preserving, memory-bounded processing of JSONL input.
//!
//! A reader thread cuts the input into batches of whole lines, rayon maps each
//! batch's lines to output bytes on every core, and the caller's thread writes
//! the results in input order. At most a few batches are in flight.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::mpsc::sync_channel;

use rayon::prelude::*;

use crate::Progress;
use crate::params::OnError;
use crate::rows::LineReader;
use crate::sink::Sink;

const BATCH_BYTES: usize = 4 << 20;
const CHUNK_LINES: usize = 64;

/// Named counts for a stage report.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Counters(pub BTreeMap<String, u64>);

impl Counters {
    /// Adds `n` to `name`.
    pub fn add(&mut self, name: &str, n: u64) {
        if let Some(v) = self.0.get_mut(name) {
            *v += n;
        } else {
            self.0.insert(name.to_owned(), n);
        }
    }

    /// The count of `name`.
    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }

    fn merge(&mut self, other: Counters) {
        for (k, v) in other.0 {
            *self.0.entry(k).or_default() += v;
        }
    }
}

/// What one line produced.
pub struct LineOut<'a> {
    /// Append complete JSON lines (each ending in `\n`) here.
    pub out: &'a mut Vec<u8>,
    /// Count rows written here.
    pub rows: u64,
    /// Anything else worth reporting.
    pub counters: &'a mut Counters,
}

struct Batch {
    data: Vec<u8>,
    lines: Vec<(u64, Range<usize>)>,
    bytes_read: u64,
}

struct Done {
    out: Vec<u8>,
    rows: u64,
    counters: Counters,
    error: Option<(u64, String)>,
}

/// Maps every line of `input` with `f` into `sink`, in order. A line whose `f`
/// fails is an error naming `input` and the line, or, with [`OnError::Skip`], is
/// left out and counted as `skipped_malformed`. Returns the counters, with
/// `lines_in` and `rows_out` filled in.
pub fn map_lines<F>(
    input: &Path,
    sink: &mut Sink,
    on_error: OnError,
    progress: &Progress,
    f: F,
) -> anyhow::Result<Counters>
where
    F: Fn(u64, &[u8], &mut LineOut) -> Result<(), String> + Sync,
{
    let mut reader = LineReader::open(input)?;
    progress.set_total(reader.len());
    let (tx, rx) = sync_channel::<anyhow::Result<Batch>>(2);
    let mut total = Counters::default();
    std::thread::scope(|s| -> anyhow::Result<()> {
        s.spawn(move || {
            loop {
                let mut batch = Batch {
                    data: Vec::with_capacity(BATCH_BYTES + (64 << 10)),
                    lines: Vec::new(),
                    bytes_read: 0,
                };
                let mut eof = false;
                while batch.data.len() < BATCH_BYTES {
                    match reader.next_line() {
                        Ok(Some((n, line))) => {
                            let start = batch.data.len();
                            batch.data.extend_from_slice(line);
                            batch.lines.push((n, start..batch.data.len()));
                        }
                        Ok(None) => {
                            eof = true;
                            break;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
                batch.bytes_read = reader.bytes_read();
                if !batch.lines.is_empty() && tx.send(Ok(batch)).is_err() {
                    return;
                }
                if eof {
                    return;
                }
            }
        });
        // Results go to a writer thread so writing overlaps the next batch's work.
        let (wtx, wrx) = sync_channel::<(Vec<Done>, u64)>(2);
        let writer = s.spawn(move || -> anyhow::Result<Counters> {
            let mut total = Counters::default();
            for (done, bytes_read) in wrx {
                for d in done {
                    sink.write_lines(&d.out, d.rows)?;
                    total.add("rows_out", d.rows);
                    total.merge(d.counters);
                }
                progress.set_done(bytes_read);
            }
            Ok(total)
        });
        let mut failure = None;
        for batch in rx {
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            let done: Vec<Done> = batch
                .lines
                .par_chunks(CHUNK_LINES)
                .map(|chunk| {
                    let mut d = Done {
                        out: Vec::new(),
                        rows: 0,
                        counters: Counters::default(),
                        error: None,
                    };
                    for (n, range) in chunk {
                        let mark = d.out.len();
                        let mut lo = LineOut {
                            out: &mut d.out,
                            rows: 0,
                            counters: &mut d.counters,
                        };
                        match f(*n, &batch.data[range.clone()], &mut lo) {
                            Ok(()) => d.rows += lo.rows,
                            Err(msg) => {
                                d.out.truncate(mark);
                                if on_error == OnError::Skip {
                                    d.counters.add("skipped_malformed", 1);
                                } else {
                                    d.error = Some((*n, msg));
                                    break;
                                }
                            }
                        }
                        d.counters.add("lines_in", 1);
                    }
                    d
                })
                .collect();
            if let Some((line, msg)) = done.iter().find_map(|d| d.error.clone()) {
                failure = Some(anyhow::anyhow!(
                    "{}:{line}: {msg}\n  help: fix the record, or set `on_error: skip` to leave such records out",
                    input.display()
                ));
                break;
            }
            if wtx.send((done, batch.bytes_read)).is_err() {
                break;
            }
        }
        drop(wtx);
        let written = writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writer thread panicked"))?;
        if let Some(e) = failure {
            return Err(e);
        }
        total = written?;
        Ok(())
    })?;
    Ok(total)
}
