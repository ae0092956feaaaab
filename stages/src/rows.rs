//! Streaming row I/O for data stages: JSONL and Parquet in and out.
//!
//! Every reader and writer here works in bounded memory: JSONL is read one
//! line at a time through a large buffer, Parquet is read one record batch
//! (1024 rows) at a time and written one batch (default 8192 rows) and one
//! row group (default 65536 rows) at a time. No function loads a whole file.
//!
//! The format of a file is chosen from its extension ([`Format::of`]):
//! `.parquet` and `.pq` are Parquet, anything else is JSONL (one JSON object
//! per line).
//!
//! Rows are exchanged as JSON objects ([`serde_json::Value`] when reading,
//! anything [`serde::Serialize`] when writing). Writing Parquet needs an
//! Arrow schema up front; [`infer_schema`] and [`infer_schema_of`] compute
//! one from the data.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::json::ReaderBuilder;
use arrow::json::reader::Decoder;
use arrow::json::writer::{LineDelimited, WriterBuilder};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::Serialize;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// Size of the read buffer of [`LineReader`].
const READ_BUFFER: usize = 1 << 20;
/// Size of the write buffer of JSONL [`RowWriter`]s.
const WRITE_BUFFER: usize = 1 << 20;
/// Rows per record batch when reading Parquet.
const PARQUET_READ_BATCH: usize = 1024;
/// Default rows per record batch when writing Parquet.
const DEFAULT_BATCH_ROWS: usize = 8192;
/// Default maximum rows per Parquet row group.
const DEFAULT_ROW_GROUP_ROWS: usize = 65536;

/// File format, chosen from the path's extension: `.parquet`/`.pq` => Parquet, anything else => JSONL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// Apache Parquet.
    Parquet,
}

impl Format {
    /// The format of `path`, from its extension (case-insensitive):
    /// `.parquet` and `.pq` are [`Format::Parquet`], anything else is [`Format::Jsonl`].
    pub fn of(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("parquet") || ext.eq_ignore_ascii_case("pq") => {
                Format::Parquet
            }
            _ => Format::Jsonl,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Jsonl => "JSONL",
            Format::Parquet => "Parquet",
        })
    }
}

/// A problem with one input record.
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}: {message}", path.display())]
pub struct RecordError {
    /// The file the record comes from.
    pub path: PathBuf,
    /// 1-based JSONL line or Parquet row.
    pub line: u64,
    /// What is wrong and what to do.
    pub message: String,
}

impl RecordError {
    fn new(path: &Path, line: u64, message: impl Into<String>) -> RecordError {
        RecordError {
            path: path.to_path_buf(),
            line,
            message: message.into(),
        }
    }
}

// ---------------------------------------------------------------------------
// LineReader
// ---------------------------------------------------------------------------

/// Streams raw JSONL lines with their 1-based line numbers, reusing one buffer.
///
/// Blank lines (whitespace only) are skipped but still counted, a trailing
/// `"\r\n"` or `"\n"` is stripped, and so is a UTF-8 byte order mark at the
/// start of line 1. Reads through a 1 MiB buffer.
#[derive(Debug)]
pub struct LineReader {
    path: PathBuf,
    reader: BufReader<File>,
    buf: Vec<u8>,
    line: u64,
    bytes_read: u64,
    len: u64,
}

impl LineReader {
    /// Opens `path` for reading; the error names the path.
    pub fn open(path: &Path) -> anyhow::Result<LineReader> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("cannot read the size of {}", path.display()))?
            .len();
        Ok(LineReader {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(READ_BUFFER, file),
            buf: Vec::new(),
            line: 0,
            bytes_read: 0,
            len,
        })
    }

    /// The next non-blank line, without its line ending, or `None` at EOF.
    pub fn next_line(&mut self) -> anyhow::Result<Option<(u64, &[u8])>> {
        loop {
            self.buf.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.buf)
                .with_context(|| {
                    format!("{}:{}: cannot read", self.path.display(), self.line + 1)
                })?;
            if n == 0 {
                return Ok(None);
            }
            self.bytes_read += n as u64;
            self.line += 1;
            let mut end = self.buf.len();
            if self.buf[..end].ends_with(b"\n") {
                end -= 1;
                if self.buf[..end].ends_with(b"\r") {
                    end -= 1;
                }
            }
            let start = if self.line == 1 && self.buf[..end].starts_with(b"\xEF\xBB\xBF") {
                3
            } else {
                0
            };
            if self.buf[start..end].iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Ok(Some((self.line, &self.buf[start..end])));
        }
    }

    /// Bytes consumed so far (for progress).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Total size of the file (for progress).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The path being read.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

// ---------------------------------------------------------------------------
// RowReader
// ---------------------------------------------------------------------------

/// Streams rows of a JSONL or Parquet file as [`serde_json::Value`] (one JSON object per row).
///
/// Also an [`Iterator`] over the same items as [`RowReader::next_row`].
/// Errors about one JSONL line do not stop the stream: the caller may skip
/// the line and go on. A read error (I/O, corrupt Parquet data) ends it.
pub struct RowReader {
    path: PathBuf,
    len: u64,
    source: Source,
}

enum Source {
    Jsonl { lines: LineReader, done: bool },
    Parquet(ParquetRows),
}

/// Parquet rows, converted to JSON one record batch at a time.
struct ParquetRows {
    batches: ParquetRecordBatchReader,
    total_rows: u64,
    /// Rows handed out so far.
    rows_done: u64,
    /// The current batch as JSON lines.
    json: Vec<u8>,
    /// Where in `json` the next row starts.
    pos: usize,
    done: bool,
}

impl fmt::Debug for RowReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RowReader")
            .field("path", &self.path)
            .field("format", &self.format())
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl RowReader {
    /// Opens a JSONL or Parquet file (by [`Format::of`]); the error names the path.
    pub fn open(path: &Path) -> anyhow::Result<RowReader> {
        match Format::of(path) {
            Format::Jsonl => {
                let lines = LineReader::open(path)?;
                Ok(RowReader {
                    path: path.to_path_buf(),
                    len: lines.len(),
                    source: Source::Jsonl { lines, done: false },
                })
            }
            Format::Parquet => {
                let (builder, len) = open_parquet(path)?;
                let total_rows =
                    u64::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0);
                let batches = builder
                    .with_batch_size(PARQUET_READ_BATCH)
                    .build()
                    .with_context(|| format!("cannot read Parquet file {}", path.display()))?;
                Ok(RowReader {
                    path: path.to_path_buf(),
                    len,
                    source: Source::Parquet(ParquetRows {
                        batches,
                        total_rows,
                        rows_done: 0,
                        json: Vec::new(),
                        pos: 0,
                        done: false,
                    }),
                })
            }
        }
    }

    /// The format being read.
    pub fn format(&self) -> Format {
        match self.source {
            Source::Jsonl { .. } => Format::Jsonl,
            Source::Parquet(_) => Format::Parquet,
        }
    }

    /// The next row with its 1-based line (JSONL) or row (Parquet) number, or `None` at the end.
    ///
    /// JSONL: a line that is not valid JSON gives a [`RecordError`] whose
    /// message starts with `not valid JSON: `, a line that is valid JSON but
    /// not an object one starting with `expected a JSON object, found `.
    /// Parquet: rows are decoded batch by batch (1024 rows) and numbered from 1.
    pub fn next_row(&mut self) -> Option<Result<(u64, Value), RecordError>> {
        match &mut self.source {
            Source::Jsonl { lines, done } => {
                if *done {
                    return None;
                }
                let failed_line = lines.line + 1;
                let (line, bytes) = match lines.next_line() {
                    Ok(Some(l)) => l,
                    Ok(None) => {
                        *done = true;
                        return None;
                    }
                    Err(e) => {
                        *done = true;
                        return Some(Err(RecordError::new(
                            &self.path,
                            failed_line,
                            format!("cannot read the file: {}", root_cause(&e)),
                        )));
                    }
                };
                Some(
                    parse_object(bytes)
                        .map(|v| (line, v))
                        .map_err(|message| RecordError::new(&self.path, line, message)),
                )
            }
            Source::Parquet(rows) => rows.next(&self.path),
        }
    }

    /// Bytes consumed so far. Exact for JSONL; for Parquet an estimate
    /// proportional to the rows read.
    pub fn bytes_read(&self) -> u64 {
        match &self.source {
            Source::Jsonl { lines, .. } => lines.bytes_read(),
            Source::Parquet(rows) => {
                if rows.total_rows == 0 {
                    if rows.done { self.len } else { 0 }
                } else {
                    let est = u128::from(rows.rows_done) * u128::from(self.len)
                        / u128::from(rows.total_rows);
                    u64::try_from(est).unwrap_or(self.len).min(self.len)
                }
            }
        }
    }

    /// Total size of the file in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty (zero bytes).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The path being read.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Iterator for RowReader {
    type Item = Result<(u64, Value), RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_row()
    }
}

impl ParquetRows {
    fn next(&mut self, path: &Path) -> Option<Result<(u64, Value), RecordError>> {
        while self.pos >= self.json.len() {
            if self.done {
                return None;
            }
            match self.batches.next() {
                None => {
                    self.done = true;
                    return None;
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(RecordError::new(
                        path,
                        self.rows_done + 1,
                        format!(
                            "cannot read Parquet data: {e}; the file may be truncated or corrupt, write it again"
                        ),
                    )));
                }
                Some(Ok(batch)) => {
                    self.json.clear();
                    self.pos = 0;
                    let mut writer = WriterBuilder::new()
                        .with_explicit_nulls(false)
                        .build::<_, LineDelimited>(&mut self.json);
                    if let Err(e) = writer.write(&batch).and_then(|()| writer.finish()) {
                        self.done = true;
                        return Some(Err(RecordError::new(
                            path,
                            self.rows_done + 1,
                            format!("cannot convert Parquet rows to JSON: {e}"),
                        )));
                    }
                }
            }
        }
        let rest = &self.json[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let line = &rest[..end];
        self.pos += end + 1;
        self.rows_done += 1;
        let row = self.rows_done;
        Some(match serde_json::from_slice::<Value>(line) {
            Ok(v @ Value::Object(_)) => Ok((row, v)),
            Ok(other) => Err(RecordError::new(
                path,
                row,
                format!("expected a JSON object, found {}", value_kind(&other)),
            )),
            Err(e) => Err(RecordError::new(
                path,
                row,
                format!("cannot convert the Parquet row to JSON: {e}"),
            )),
        })
    }
}

fn open_parquet(path: &Path) -> anyhow::Result<(ParquetRecordBatchReaderBuilder<File>, u64)> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("cannot read the size of {}", path.display()))?
        .len();
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).with_context(|| {
        format!(
            "cannot read {} as Parquet (the format is chosen by the .parquet/.pq extension; \
             rename the file if it is JSONL)",
            path.display()
        )
    })?;
    Ok((builder, len))
}

/// Parses one JSONL line into a JSON object, or says what is wrong.
fn parse_object(bytes: &[u8]) -> Result<Value, String> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(other) => Err(format!(
            "expected a JSON object, found {}; every line must be one JSON object",
            value_kind(&other)
        )),
        Err(e) => Err(format!(
            "not valid JSON: {e}; every line must be one complete JSON object"
        )),
    }
}

fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn root_cause(e: &anyhow::Error) -> String {
    e.root_cause().to_string()
}

// ---------------------------------------------------------------------------
// RowWriter
// ---------------------------------------------------------------------------

/// Writes rows to a JSONL or Parquet file (by [`Format::of`]).
///
/// For Parquet a schema is required up front (use [`infer_schema`] or build
/// one); rows are buffered in batches of `batch_rows` (default 8192) and
/// written with parquet's `ArrowWriter` (snappy compression, row groups of at
/// most 65536 rows), so memory stays bounded. Fields of a row that are not in
/// the schema are an error, not silently dropped.
///
/// [`RowWriter::finish`] must be called: dropping a writer leaves a partial
/// file (and a Parquet file without its footer is unreadable).
pub struct RowWriter {
    path: PathBuf,
    rows: u64,
    sink: Sink,
}

enum Sink {
    Jsonl {
        out: BufWriter<File>,
        scratch: Vec<u8>,
    },
    Parquet(Box<ParquetSink>),
}

struct ParquetSink {
    schema: SchemaRef,
    /// The output file, until the `ArrowWriter` is created on the first batch.
    file: Option<File>,
    writer: Option<ArrowWriter<File>>,
    decoder: Decoder,
    /// Buffered rows as JSON, each followed by `\n`.
    buf: Vec<u8>,
    /// Where each row in `buf` ends; its length is the number of buffered rows.
    ends: Vec<usize>,
    batch_rows: usize,
    row_group_rows: usize,
    failed: bool,
}

impl fmt::Debug for RowWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RowWriter")
            .field("path", &self.path)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

fn json_decoder(schema: &SchemaRef, batch_rows: usize) -> anyhow::Result<Decoder> {
    ReaderBuilder::new(schema.clone())
        .with_batch_size(batch_rows)
        .with_coerce_primitive(true)
        .with_strict_mode(true)
        .build_decoder()
        .map_err(|e| anyhow!("cannot convert rows to this Arrow schema: {e}"))
}

impl RowWriter {
    /// Creates (truncates) `path`. JSONL: `schema` is ignored. Parquet:
    /// `schema` must be `Some`, else an error saying so.
    pub fn create(path: &Path, schema: Option<SchemaRef>) -> anyhow::Result<RowWriter> {
        let format = Format::of(path);
        let schema = match (format, schema) {
            (Format::Parquet, None) => bail!(
                "cannot write {}: writing Parquet needs an Arrow schema; \
                 pass one from infer_schema/infer_schema_of or build one",
                path.display()
            ),
            (_, s) => s,
        };
        if let (Format::Parquet, Some(schema)) = (format, &schema)
            && let Some(field) = empty_struct(schema.fields(), "")
        {
            bail!(
                "cannot write {}: field `{field}` is an empty object in every row, and Parquet \
                 cannot store a struct without fields; drop the field or give it a field \
                 in an earlier stage",
                path.display()
            );
        }
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let sink = match schema {
            Some(schema) if format == Format::Parquet => {
                let decoder = json_decoder(&schema, DEFAULT_BATCH_ROWS)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                Sink::Parquet(Box::new(ParquetSink {
                    schema,
                    file: Some(file),
                    writer: None,
                    decoder,
                    buf: Vec::new(),
                    ends: Vec::new(),
                    batch_rows: DEFAULT_BATCH_ROWS,
                    row_group_rows: DEFAULT_ROW_GROUP_ROWS,
                    failed: false,
                }))
            }
            _ => Sink::Jsonl {
                out: BufWriter::with_capacity(WRITE_BUFFER, file),
                scratch: Vec::new(),
            },
        };
        Ok(RowWriter {
            path: path.to_path_buf(),
            rows: 0,
            sink,
        })
    }

    /// Parquet: sets how many rows are buffered before they are converted
    /// and handed to the Parquet writer (default 8192, at least 1). Call
    /// before the first write. No effect on JSONL.
    pub fn with_batch_rows(mut self, batch_rows: usize) -> anyhow::Result<RowWriter> {
        if let Sink::Parquet(p) = &mut self.sink {
            p.batch_rows = batch_rows.max(1);
            p.decoder = json_decoder(&p.schema, p.batch_rows)?;
        }
        Ok(self)
    }

    /// Parquet: sets the maximum rows per row group (default 65536, at least
    /// 1). Call before the first write. No effect on JSONL.
    pub fn with_row_group_rows(mut self, row_group_rows: usize) -> RowWriter {
        if let Sink::Parquet(p) = &mut self.sink {
            p.row_group_rows = row_group_rows.max(1);
        }
        self
    }

    /// Writes one row: any [`Serialize`] value that serializes to a JSON
    /// object (a [`serde_json::Value`] or a struct).
    pub fn write<T: Serialize>(&mut self, row: &T) -> anyhow::Result<()> {
        let row_no = self.rows + 1;
        let path = &self.path;
        match &mut self.sink {
            Sink::Jsonl { out, scratch } => {
                scratch.clear();
                serde_json::to_writer(&mut *scratch, row).with_context(|| {
                    format!("{}: row {row_no}: cannot serialize the row", path.display())
                })?;
                check_object_start(scratch, path, row_no)?;
                scratch.push(b'\n');
                out.write_all(scratch)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Sink::Parquet(p) => {
                p.check_usable(path)?;
                let start = p.buf.len();
                if let Err(e) = serde_json::to_writer(&mut p.buf, row) {
                    p.buf.truncate(start);
                    bail!(
                        "{}: row {row_no}: cannot serialize the row: {e}",
                        path.display()
                    );
                }
                if let Err(e) = check_object_start(&p.buf[start..], path, row_no) {
                    p.buf.truncate(start);
                    return Err(e);
                }
                p.buf.push(b'\n');
                p.ends.push(p.buf.len());
                if p.ends.len() >= p.batch_rows {
                    p.flush_batch(path, row_no)?;
                }
            }
        }
        self.rows += 1;
        Ok(())
    }

    /// Appends one already-serialized JSON object (a trailing newline is
    /// optional). JSONL: the fast path, the bytes are copied as they are
    /// after a cheap check that they start with `{` and hold no line break.
    /// Parquet: the JSON is checked and written as a row.
    pub fn write_raw_json(&mut self, json: &[u8]) -> anyhow::Result<()> {
        let row_no = self.rows + 1;
        let path = &self.path;
        let json = json
            .strip_suffix(b"\n")
            .map(|j| j.strip_suffix(b"\r").unwrap_or(j))
            .unwrap_or(json);
        match &mut self.sink {
            Sink::Jsonl { out, .. } => {
                check_object_start(json, path, row_no)?;
                if json.iter().any(|&b| b == b'\n' || b == b'\r') {
                    bail!(
                        "{}: row {row_no}: the JSON contains a line break, which would split it \
                         across JSONL lines; serialize it compactly (serde_json::to_writer)",
                        path.display()
                    );
                }
                out.write_all(json)
                    .and_then(|()| out.write_all(b"\n"))
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Sink::Parquet(p) => {
                p.check_usable(path)?;
                check_object_start(json, path, row_no)?;
                if let Err(e) = serde_json::from_slice::<IgnoredAny>(json) {
                    bail!("{}: row {row_no}: not valid JSON: {e}", path.display());
                }
                p.buf.extend_from_slice(json);
                p.buf.push(b'\n');
                p.ends.push(p.buf.len());
                if p.ends.len() >= p.batch_rows {
                    p.flush_batch(path, row_no)?;
                }
            }
        }
        self.rows += 1;
        Ok(())
    }

    /// Flushes and closes the file; returns the number of rows written.
    pub fn finish(self) -> anyhow::Result<u64> {
        let path = &self.path;
        match self.sink {
            Sink::Jsonl { out, .. } => {
                out.into_inner()
                    .map_err(|e| e.into_error())
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Sink::Parquet(mut p) => {
                p.check_usable(path)?;
                p.flush_batch(path, self.rows)?;
                p.arrow_writer(path)?;
                if let Some(w) = p.writer.take() {
                    w.close().with_context(|| {
                        format!("cannot finish Parquet file {}", path.display())
                    })?;
                }
            }
        }
        Ok(self.rows)
    }
}

/// The dotted name of the first struct without fields in `fields`, if any.
fn empty_struct(fields: &arrow::datatypes::Fields, prefix: &str) -> Option<String> {
    fields.iter().find_map(|f| {
        let name = if prefix.is_empty() {
            f.name().clone()
        } else {
            format!("{prefix}.{}", f.name())
        };
        let mut dt = f.data_type();
        let mut name = name;
        while let DataType::List(item) | DataType::LargeList(item) = dt {
            name.push_str("[]");
            dt = item.data_type();
        }
        match dt {
            DataType::Struct(inner) if inner.is_empty() => Some(name),
            DataType::Struct(inner) => empty_struct(inner, &name),
            _ => None,
        }
    })
}

/// Checks that serialized JSON starts with `{`.
fn check_object_start(json: &[u8], path: &Path, row_no: u64) -> anyhow::Result<()> {
    match json.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(()),
        _ => bail!(
            "{}: row {row_no}: a row must be a JSON object, got `{}`",
            path.display(),
            String::from_utf8_lossy(&json[..json.len().min(40)])
        ),
    }
}

impl ParquetSink {
    fn check_usable(&self, path: &Path) -> anyhow::Result<()> {
        if self.failed {
            bail!(
                "cannot write {}: an earlier write failed, so the file is incomplete",
                path.display()
            );
        }
        Ok(())
    }

    fn arrow_writer(&mut self, path: &Path) -> anyhow::Result<&mut ArrowWriter<File>> {
        if self.writer.is_none() {
            let file = self
                .file
                .take()
                .ok_or_else(|| anyhow!("cannot write {}: the file is closed", path.display()))?;
            let props = WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .set_max_row_group_row_count(Some(self.row_group_rows.max(1)))
                .build();
            let writer = ArrowWriter::try_new(file, self.schema.clone(), Some(props))
                .with_context(|| {
                    format!(
                        "cannot write {}: the Arrow schema cannot be stored as Parquet",
                        path.display()
                    )
                })?;
            self.writer = Some(writer);
        }
        self.writer
            .as_mut()
            .ok_or_else(|| anyhow!("cannot write {}", path.display()))
    }

    /// Converts the buffered rows (the last of which is row `last_row`) to a
    /// record batch and hands it to the Parquet writer.
    fn flush_batch(&mut self, path: &Path, last_row: u64) -> anyhow::Result<()> {
        if self.ends.is_empty() {
            return Ok(());
        }
        let first_row = (last_row + 1).saturating_sub(self.ends.len() as u64);
        let result = self.decode_buffered();
        let batch = match result {
            Ok(batch) => batch,
            Err(e) => {
                self.failed = true;
                return Err(self.explain_bad_batch(path, first_row, e));
            }
        };
        self.buf.clear();
        self.ends.clear();
        if let Some(batch) = batch {
            let written = self.arrow_writer(path).and_then(|w| {
                w.write(&batch)
                    .with_context(|| format!("cannot write Parquet file {}", path.display()))
            });
            if let Err(e) = written {
                self.failed = true;
                return Err(e);
            }
        }
        Ok(())
    }

    fn decode_buffered(&mut self) -> Result<Option<arrow::record_batch::RecordBatch>, String> {
        let consumed = self.decoder.decode(&self.buf).map_err(|e| e.to_string())?;
        if consumed != self.buf.len() || self.decoder.len() != self.ends.len() {
            return Err(format!(
                "the JSON decoder took {} of {} rows",
                self.decoder.len(),
                self.ends.len()
            ));
        }
        self.decoder.flush().map_err(|e| e.to_string())
    }

    /// Finds the first buffered row that does not fit the schema and says so.
    fn explain_bad_batch(&self, path: &Path, first_row: u64, batch_err: String) -> anyhow::Error {
        let hint = "make every row match the schema (infer it with infer_schema over the same \
                    rows) or fix the rows in an earlier stage";
        let mut start = 0;
        for (i, &end) in self.ends.iter().enumerate() {
            let line = &self.buf[start..end];
            start = end;
            let one = json_decoder(&self.schema, 1).and_then(|mut d| {
                d.decode(line).map_err(|e| anyhow!("{e}"))?;
                d.flush().map_err(|e| anyhow!("{e}"))?;
                Ok(())
            });
            if let Err(e) = one {
                return anyhow!(
                    "{}: row {}: does not fit the Parquet schema: {e}; {hint}",
                    path.display(),
                    first_row + i as u64
                );
            }
        }
        anyhow!(
            "{}: rows {first_row}..{}: do not fit the Parquet schema: {batch_err}; {hint}",
            path.display(),
            first_row + self.ends.len() as u64 - 1
        )
    }
}

// ---------------------------------------------------------------------------
// Schema inference
// ---------------------------------------------------------------------------

/// Infers one Arrow schema covering every row of a JSONL or Parquet file, streaming.
///
/// Parquet: the file's own Arrow schema. JSONL: every line is scanned and
/// the types are merged as follows.
///
/// * Integers become `Int64`, floats `Float64`, an integer and a float seen
///   for the same field `Float64`; integers above `i64::MAX` count as floats.
/// * Objects become `Struct`, with fields in the order first seen in the
///   data; arrays become `List` of the merged type of their elements, so
///   arrays of objects become `List<Struct>`.
/// * Other mixes of scalars (e.g. a string in one row and a number or boolean
///   in another) become `Utf8`; [`RowWriter`] then writes the non-string
///   values as their JSON text.
/// * A field (or list element) only ever seen as `null` or as an empty array
///   `[]` carries no type information: it becomes `Utf8`, so `[]` alone gives
///   `List<Utf8>`. An empty array never poisons the type: `[]` in some rows
///   and `[{..}]` in others gives `List<Struct<..>>`.
/// * Every field is nullable, so fields absent from some rows are fine.
/// * A field that is a list, object or scalar in different rows cannot be
///   stored in one column: that is an error naming the field and the line.
pub fn infer_schema(path: &Path) -> anyhow::Result<SchemaRef> {
    match Format::of(path) {
        Format::Parquet => {
            let (builder, _) = open_parquet(path)?;
            Ok(builder.schema().clone())
        }
        Format::Jsonl => {
            let mut lines = LineReader::open(path)?;
            let mut acc = Ty::Null;
            while let Some((line, bytes)) = lines.next_line()? {
                let ty = match serde_json::from_slice::<Ty>(bytes) {
                    Ok(ty) => ty,
                    Err(e) if e.is_data() => {
                        return Err(RecordError::new(
                            path,
                            line,
                            format!("cannot infer a column type: {e}"),
                        )
                        .into());
                    }
                    Err(e) => {
                        return Err(RecordError::new(
                            path,
                            line,
                            format!(
                                "not valid JSON: {e}; every line must be one complete JSON object"
                            ),
                        )
                        .into());
                    }
                };
                merge_row(&mut acc, ty).map_err(|m| RecordError::new(path, line, m))?;
            }
            Ok(finish_schema(acc))
        }
    }
}

/// The same as [`infer_schema`] over rows already in memory; errors name the
/// 1-based row number.
///
/// Struct fields come in the iteration order of the objects' maps, which is
/// the order first seen in the data only where `serde_json`'s
/// `preserve_order` feature is enabled (else alphabetical). [`infer_schema`]
/// over a JSONL file always keeps the order of the file.
pub fn infer_schema_of<'a>(rows: impl IntoIterator<Item = &'a Value>) -> anyhow::Result<SchemaRef> {
    let mut acc = Ty::Null;
    for (i, row) in rows.into_iter().enumerate() {
        let ty = ty_of_value(row)
            .map_err(|e| anyhow!("row {}: cannot infer a column type: {e}", i + 1))?;
        merge_row(&mut acc, ty).map_err(|m| anyhow!("row {}: {m}", i + 1))?;
    }
    Ok(finish_schema(acc))
}

/// The type lattice used by inference.
#[derive(Debug, Clone, PartialEq)]
enum Ty {
    /// Nothing known yet: only `null` (or, as a list element, nothing) seen.
    Null,
    Bool,
    Int,
    Float,
    Str,
    List(Box<Ty>),
    Struct(Members),
}

/// Struct fields in first-seen order, with an index by name.
#[derive(Debug, Clone, Default, PartialEq)]
struct Members {
    fields: Vec<(String, Ty)>,
    index: HashMap<String, usize>,
}

impl Ty {
    fn describe(&self) -> &'static str {
        match self {
            Ty::Null => "null",
            Ty::Bool => "a boolean",
            Ty::Int => "an integer",
            Ty::Float => "a float",
            Ty::Str => "a string",
            Ty::List(_) => "a list",
            Ty::Struct(_) => "an object",
        }
    }

    fn is_scalar(&self) -> bool {
        matches!(self, Ty::Bool | Ty::Int | Ty::Float | Ty::Str)
    }
}

/// Two types that cannot share a column; `path` is innermost first.
#[derive(Debug)]
struct Conflict {
    path: Vec<String>,
    earlier: &'static str,
    here: &'static str,
}

impl Conflict {
    fn at(mut self, segment: &str) -> Conflict {
        self.path.push(segment.to_string());
        self
    }

    fn field(&self) -> String {
        let mut out = String::new();
        for seg in self.path.iter().rev() {
            if seg == "[]" {
                out.push_str("[]");
            } else {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(seg);
            }
        }
        out
    }
}

/// Merges `new` into `acc`.
fn merge(acc: &mut Ty, new: Ty) -> Result<(), Conflict> {
    if new == Ty::Null {
        return Ok(());
    }
    if *acc == Ty::Null {
        *acc = match &new {
            Ty::List(_) => Ty::List(Box::new(Ty::Null)),
            Ty::Struct(_) => Ty::Struct(Members::default()),
            scalar => scalar.clone(),
        };
    }
    match (acc, new) {
        (Ty::List(a), Ty::List(b)) => merge(a, *b).map_err(|c| c.at("[]")),
        (Ty::Struct(a), Ty::Struct(b)) => {
            for (name, ty) in b.fields {
                a.merge_field(name, ty)?;
            }
            Ok(())
        }
        (a, b) if a.is_scalar() && b.is_scalar() => {
            *a = match (&*a, &b) {
                (x, y) if x == y => b,
                (Ty::Int, Ty::Float) | (Ty::Float, Ty::Int) => Ty::Float,
                _ => Ty::Str,
            };
            Ok(())
        }
        (a, b) => Err(Conflict {
            path: Vec::new(),
            earlier: a.describe(),
            here: b.describe(),
        }),
    }
}

impl Members {
    fn merge_field(&mut self, name: String, ty: Ty) -> Result<(), Conflict> {
        if self.index.len() != self.fields.len() {
            self.reindex();
        }
        match self.index.get(&name) {
            Some(&i) => merge(&mut self.fields[i].1, ty).map_err(|c| c.at(&name)),
            None => {
                let mut slot = Ty::Null;
                merge(&mut slot, ty).map_err(|c| c.at(&name))?;
                self.index.insert(name.clone(), self.fields.len());
                self.fields.push((name, slot));
                Ok(())
            }
        }
    }

    fn reindex(&mut self) {
        self.index = self
            .fields
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
    }
}

/// Merges one row's type into the accumulated row type, or explains why not.
fn merge_row(acc: &mut Ty, row: Ty) -> Result<(), String> {
    if !matches!(row, Ty::Struct(_)) {
        return Err(format!(
            "expected a JSON object, found {}; every row must be one JSON object",
            row.describe()
        ));
    }
    merge(acc, row).map_err(|c| {
        format!(
            "field `{}` is {} here but {} in earlier rows, and one column cannot hold both; \
             give the field one type in every row (e.g. fix it in an earlier stage)",
            c.field(),
            c.here,
            c.earlier
        )
    })
}

fn ty_of_value(v: &Value) -> Result<Ty, String> {
    Ok(match v {
        Value::Null => Ty::Null,
        Value::Bool(_) => Ty::Bool,
        Value::Number(n) => number_ty(n.is_i64()),
        Value::String(_) => Ty::Str,
        Value::Array(items) => {
            let mut item = Ty::Null;
            for x in items {
                merge(&mut item, ty_of_value(x)?).map_err(|c| array_conflict(&c))?;
            }
            Ty::List(Box::new(item))
        }
        Value::Object(map) => {
            let mut members = Members::default();
            for (k, x) in map {
                members.fields.push((k.clone(), ty_of_value(x)?));
            }
            Ty::Struct(members)
        }
    })
}

fn number_ty(is_int: bool) -> Ty {
    if is_int { Ty::Int } else { Ty::Float }
}

fn array_conflict(c: &Conflict) -> String {
    let field = c.field();
    let at = if field.is_empty() {
        String::new()
    } else {
        format!(" (at `{field}` inside the elements)")
    };
    format!(
        "an array holds both {} and {}{at}; the elements of an array must share one type",
        c.earlier, c.here
    )
}

impl<'de> Deserialize<'de> for Ty {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Ty, D::Error> {
        deserializer.deserialize_any(TyVisitor)
    }
}

/// Computes the type of a JSON value straight from its text, keeping the
/// order of object keys.
struct TyVisitor;

impl<'de> Visitor<'de> for TyVisitor {
    type Value = Ty;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Ty, E> {
        Ok(Ty::Bool)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Ty, E> {
        Ok(Ty::Int)
    }

    fn visit_u64<E>(self, v: u64) -> Result<Ty, E> {
        Ok(number_ty(i64::try_from(v).is_ok()))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Ty, E> {
        Ok(Ty::Float)
    }

    fn visit_str<E>(self, _: &str) -> Result<Ty, E> {
        Ok(Ty::Str)
    }

    fn visit_unit<E>(self) -> Result<Ty, E> {
        Ok(Ty::Null)
    }

    fn visit_none<E>(self) -> Result<Ty, E> {
        Ok(Ty::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Ty, A::Error> {
        let mut item = Ty::Null;
        while let Some(ty) = seq.next_element::<Ty>()? {
            merge(&mut item, ty).map_err(|c| de::Error::custom(array_conflict(&c)))?;
        }
        Ok(Ty::List(Box::new(item)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ty, A::Error> {
        let mut members = Members::default();
        while let Some(key) = map.next_key::<String>()? {
            let ty = map.next_value::<Ty>()?;
            members.fields.push((key, ty));
        }
        Ok(Ty::Struct(members))
    }
}

fn data_type(ty: &Ty) -> DataType {
    match ty {
        Ty::Null | Ty::Str => DataType::Utf8,
        Ty::Bool => DataType::Boolean,
        Ty::Int => DataType::Int64,
        Ty::Float => DataType::Float64,
        Ty::List(item) => DataType::List(Arc::new(Field::new_list_field(data_type(item), true))),
        Ty::Struct(m) => DataType::Struct(struct_fields(m).into()),
    }
}

fn struct_fields(m: &Members) -> Vec<Field> {
    m.fields
        .iter()
        .map(|(name, ty)| Field::new(name, data_type(ty), true))
        .collect()
}

fn finish_schema(acc: Ty) -> SchemaRef {
    match acc {
        Ty::Struct(m) => Arc::new(Schema::new(struct_fields(&m))),
        _ => Arc::new(Schema::empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    fn read_all(path: &Path) -> Vec<(u64, Value)> {
        RowReader::open(path)
            .expect("open")
            .map(|r| r.expect("row"))
            .collect()
    }

    fn search_r1_rows(n: usize) -> Vec<Value> {
        (0..n)
            .map(|i| {
                json!({
                    "data_source": "search_r1",
                    "prompt": [{"role": "user", "content": format!("Question: x{i} naïve 東京")}],
                    "ability": "search_reasoning",
                    "extra_info": {"question": format!("q{i}"), "answer": "a", "split_index": i as i64, "total_splits": 2}
                })
            })
            .collect()
    }

    #[test]
    fn format_from_extension() {
        assert_eq!(Format::of(Path::new("a/b.parquet")), Format::Parquet);
        assert_eq!(Format::of(Path::new("b.PQ")), Format::Parquet);
        assert_eq!(Format::of(Path::new("b.jsonl")), Format::Jsonl);
        assert_eq!(Format::of(Path::new("b")), Format::Jsonl);
        assert_eq!(Format::of(Path::new("parquet")), Format::Jsonl);
    }

    #[test]
    fn line_reader_skips_blanks_strips_crlf_and_bom() {
        let dir = tmp();
        let path = dir.path().join("x.jsonl");
        std::fs::write(
            &path,
            b"\xEF\xBB\xBF{\"a\":1}\r\n\n  \t\r\n{\"b\":2}\n{\"c\":3}",
        )
        .unwrap();
        let mut r = LineReader::open(&path).unwrap();
        assert_eq!(r.len(), std::fs::metadata(&path).unwrap().len());
        let mut got = Vec::new();
        while let Some((n, line)) = r.next_line().unwrap() {
            got.push((n, String::from_utf8(line.to_vec()).unwrap()));
        }
        assert_eq!(
            got,
            vec![
                (1, "{\"a\":1}".to_string()),
                (4, "{\"b\":2}".to_string()),
                (5, "{\"c\":3}".to_string())
            ]
        );
        assert_eq!(r.bytes_read(), r.len());
    }

    #[test]
    fn line_reader_missing_file_names_path() {
        let err = LineReader::open(Path::new("/nonexistent/rows.jsonl")).unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/rows.jsonl"),
            "{err:#}"
        );
    }

    #[test]
    fn jsonl_round_trip_with_unicode_blank_lines_and_crlf() {
        let dir = tmp();
        let path = dir.path().join("out.jsonl");
        let rows = vec![
            json!({"text": "naïve 東京 🚀", "n": 1}),
            json!({"text": "line\nbreak \"quoted\"", "nested": {"a": [1, 2.5]}}),
        ];
        let mut w = RowWriter::create(&path, None).unwrap();
        for r in &rows {
            w.write(r).unwrap();
        }
        w.write_raw_json(b"{\"raw\":true}\n").unwrap();
        assert_eq!(w.finish().unwrap(), 3);
        let got = read_all(&path);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], (1, rows[0].clone()));
        assert_eq!(got[1], (2, rows[1].clone()));
        assert_eq!(got[2], (3, json!({"raw": true})));

        // The same rows with CRLF endings and blank lines in between.
        let crlf = dir.path().join("crlf.jsonl");
        let mut text = String::new();
        for r in &rows {
            text.push_str(&serde_json::to_string(r).unwrap());
            text.push_str("\r\n\r\n");
        }
        std::fs::write(&crlf, text).unwrap();
        let got = read_all(&crlf);
        assert_eq!(got, vec![(1, rows[0].clone()), (3, rows[1].clone())]);
    }

    #[test]
    fn malformed_json_reports_path_and_line_and_stream_goes_on() {
        let dir = tmp();
        let path = dir.path().join("bad.jsonl");
        std::fs::write(&path, "{\"a\":1}\n\n{\"a\":\n{\"a\":3}\n").unwrap();
        let mut r = RowReader::open(&path).unwrap();
        assert_eq!(r.format(), Format::Jsonl);
        assert_eq!(r.next_row().unwrap().unwrap().0, 1);
        let err = r.next_row().unwrap().unwrap_err();
        assert_eq!(err.line, 3);
        assert_eq!(err.path, path);
        assert!(
            err.message.starts_with("not valid JSON: "),
            "{}",
            err.message
        );
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("{}:3: not valid JSON", path.display())),
            "{shown}"
        );
        assert_eq!(r.next_row().unwrap().unwrap(), (4, json!({"a": 3})));
        assert!(r.next_row().is_none());
    }

    #[test]
    fn non_object_line_is_an_error() {
        let dir = tmp();
        let path = dir.path().join("arr.jsonl");
        std::fs::write(&path, "[1,2]\n\"s\"\n").unwrap();
        let errs: Vec<RecordError> = RowReader::open(&path)
            .unwrap()
            .map(|r| r.unwrap_err())
            .collect();
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0].line, 1);
        assert!(
            errs[0]
                .message
                .starts_with("expected a JSON object, found an array"),
            "{}",
            errs[0].message
        );
        assert!(
            errs[1]
                .message
                .starts_with("expected a JSON object, found a string"),
            "{}",
            errs[1].message
        );
    }

    #[test]
    fn writer_rejects_non_objects_and_parquet_without_schema() {
        let dir = tmp();
        let mut w = RowWriter::create(&dir.path().join("o.jsonl"), None).unwrap();
        assert!(w.write(&json!([1])).is_err());
        assert!(w.write_raw_json(b"{\"a\":\n1}").is_err());
        assert!(w.write_raw_json(b"42").is_err());
        assert_eq!(w.finish().unwrap(), 0);
        let err = RowWriter::create(&dir.path().join("o.parquet"), None).unwrap_err();
        assert!(err.to_string().contains("needs an Arrow schema"), "{err}");
    }

    #[test]
    fn parquet_round_trip_of_search_r1_records() {
        let dir = tmp();
        let path = dir.path().join("train.parquet");
        let rows = search_r1_rows(5);
        let schema = infer_schema_of(&rows).unwrap();

        let prompt = schema.field_with_name("prompt").unwrap();
        let DataType::List(item) = prompt.data_type() else {
            panic!("prompt is {:?}", prompt.data_type())
        };
        let DataType::Struct(fields) = item.data_type() else {
            panic!("prompt item is {:?}", item.data_type())
        };
        let mut names: Vec<_> = fields
            .iter()
            .map(|f| (f.name().as_str(), f.data_type().clone()))
            .collect();
        names.sort_by_key(|(n, _)| *n);
        assert_eq!(
            names,
            vec![("content", DataType::Utf8), ("role", DataType::Utf8)]
        );
        let DataType::Struct(extra) = schema.field_with_name("extra_info").unwrap().data_type()
        else {
            panic!("extra_info is not a struct")
        };
        assert_eq!(
            extra.find("split_index").unwrap().1.data_type(),
            &DataType::Int64
        );

        let mut w = RowWriter::create(&path, Some(schema.clone())).unwrap();
        for r in &rows[..4] {
            w.write(r).unwrap();
        }
        w.write_raw_json(serde_json::to_string(&rows[4]).unwrap().as_bytes())
            .unwrap();
        assert_eq!(w.finish().unwrap(), 5);

        let mut r = RowReader::open(&path).unwrap();
        assert_eq!(r.format(), Format::Parquet);
        assert_eq!(r.bytes_read(), 0);
        let got: Vec<_> = r.by_ref().map(|x| x.unwrap()).collect();
        assert_eq!(r.bytes_read(), r.len());
        let expected: Vec<_> = rows
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, v)| (i as u64 + 1, v))
            .collect();
        assert_eq!(got, expected);
        assert_eq!(infer_schema(&path).unwrap().fields(), schema.fields());
    }

    #[test]
    fn parquet_writer_names_the_bad_row() {
        let dir = tmp();
        let path = dir.path().join("bad.parquet");
        let schema = infer_schema_of(&[json!({"a": 1})]).unwrap();
        let mut w = RowWriter::create(&path, Some(schema))
            .unwrap()
            .with_batch_rows(4)
            .unwrap();
        w.write(&json!({"a": 1})).unwrap();
        w.write(&json!({"a": 2})).unwrap();
        w.write(&json!({"a": 3, "extra": "x"})).unwrap();
        let err = w.write(&json!({"a": 4})).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("bad.parquet: row 3: does not fit the Parquet schema"),
            "{msg}"
        );
        assert!(w.write(&json!({"a": 5})).is_err());
    }

    #[test]
    fn parquet_writer_rejects_empty_structs_up_front() {
        let dir = tmp();
        let rows = [json!({"a": 1, "m": [{"x": {}}]})];
        let schema = infer_schema_of(&rows).unwrap();
        let err = RowWriter::create(&dir.path().join("e.parquet"), Some(schema)).unwrap_err();
        assert!(
            err.to_string().contains("field `m[].x` is an empty object"),
            "{err}"
        );
        // JSONL has no such limit.
        let mut w = RowWriter::create(&dir.path().join("e.jsonl"), None).unwrap();
        w.write(&rows[0]).unwrap();
        assert_eq!(w.finish().unwrap(), 1);
    }

    #[test]
    fn parquet_raw_json_may_span_lines() {
        let dir = tmp();
        let path = dir.path().join("raw.parquet");
        let schema = infer_schema_of(&[json!({"a": 1, "b": "x"})]).unwrap();
        let mut w = RowWriter::create(&path, Some(schema))
            .unwrap()
            .with_batch_rows(3)
            .unwrap();
        w.write_raw_json(b"{\n  \"a\": 1,\n  \"b\": \"x\"\n}\n")
            .unwrap();
        w.write_raw_json(b"{\"a\": 2}").unwrap();
        assert!(w.write_raw_json(b"{\"a\": 3} {\"a\": 4}").is_err());
        assert!(w.write_raw_json(b"{\"a\": ").is_err());
        // The third row completes a batch, which then fails to convert.
        let err = format!("{:#}", w.write_raw_json(b"{\"a\": \"three\"}").unwrap_err());
        assert!(
            err.contains("raw.parquet: row 3: does not fit the Parquet schema"),
            "{err}"
        );
        assert!(
            w.finish()
                .unwrap_err()
                .to_string()
                .contains("an earlier write failed")
        );
    }

    #[test]
    fn empty_parquet_file_is_valid() {
        let dir = tmp();
        let path = dir.path().join("empty.parquet");
        let schema = infer_schema_of(&[json!({"a": "x"})]).unwrap();
        let w = RowWriter::create(&path, Some(schema)).unwrap();
        assert_eq!(w.finish().unwrap(), 0);
        assert!(read_all(&path).is_empty());
    }

    #[test]
    fn inference_handles_missing_fields_empty_arrays_and_number_merge() {
        let rows = [
            json!({"id": 1, "score": 1, "docs": [], "tags": [], "meta": {"x": 1}}),
            json!({"id": 2, "score": 2.5, "docs": [{"title": "t", "rank": 1}], "tags": [], "extra": null}),
            json!({"id": 3, "score": 3, "docs": [], "meta": {"y": "b"}, "mixed": 1}),
            json!({"id": 4, "mixed": "one", "docs": [{"rank": 2.0}]}),
        ];
        let schema = infer_schema_of(&rows).unwrap();
        let ty = |n: &str| schema.field_with_name(n).unwrap().data_type().clone();
        assert_eq!(ty("id"), DataType::Int64);
        assert_eq!(ty("score"), DataType::Float64);
        assert_eq!(
            ty("tags"),
            DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true)))
        );
        assert_eq!(ty("extra"), DataType::Utf8);
        assert_eq!(ty("mixed"), DataType::Utf8);
        let DataType::List(doc) = ty("docs") else {
            panic!("docs: {:?}", ty("docs"))
        };
        let DataType::Struct(doc_fields) = doc.data_type() else {
            panic!("{doc:?}")
        };
        assert_eq!(
            doc_fields.find("title").unwrap().1.data_type(),
            &DataType::Utf8
        );
        assert_eq!(
            doc_fields.find("rank").unwrap().1.data_type(),
            &DataType::Float64
        );
        let DataType::Struct(meta) = ty("meta") else {
            panic!()
        };
        assert_eq!(meta.len(), 2);
        assert!(schema.fields().iter().all(|f| f.is_nullable()));

        // The same rows through a Parquet file and back.
        let dir = tmp();
        let path = dir.path().join("mixed.parquet");
        let mut w = RowWriter::create(&path, Some(schema)).unwrap();
        for r in &rows {
            w.write(r).unwrap();
        }
        w.finish().unwrap();
        let got = read_all(&path);
        assert_eq!(got[0].1["docs"], json!([]));
        assert_eq!(got[1].1["docs"], json!([{"title": "t", "rank": 1.0}]));
        assert_eq!(got[2].1["mixed"], json!("1"));
        assert_eq!(got[3].1["mixed"], json!("one"));
        assert!(got[3].1.get("score").is_none());
    }

    #[test]
    fn jsonl_inference_keeps_field_order_and_reports_conflicts() {
        let dir = tmp();
        let path = dir.path().join("in.jsonl");
        std::fs::write(
            &path,
            "{\"zeta\": 1, \"prompt\": [], \"alpha\": {\"role\": \"u\", \"content\": \"c\"}}\n\n\
             {\"prompt\": [{\"role\": \"user\", \"content\": \"x\"}], \"mid\": true}\n",
        )
        .unwrap();
        let schema = infer_schema(&path).unwrap();
        let names: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["zeta", "prompt", "alpha", "mid"]);
        let DataType::List(item) = schema.field(1).data_type() else {
            panic!()
        };
        let DataType::Struct(fields) = item.data_type() else {
            panic!("{item:?}")
        };
        let names: Vec<_> = fields.iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["role", "content"]);

        std::fs::write(&path, "{\"a\": {\"b\": [1]}}\n{\"a\": {\"b\": 2}}\n").unwrap();
        let err = infer_schema(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "{}:2: field `a.b` is an integer here but a list",
                path.display()
            )),
            "{err}"
        );

        std::fs::write(&path, "{\"a\": 1}\n{\"a\": \n").unwrap();
        let err = infer_schema(&path).unwrap_err().to_string();
        assert!(err.contains(":2: not valid JSON"), "{err}");

        let err = infer_schema_of(&[json!({"a": [[1], 2]})])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("row 1") && err.contains("an array holds both a list and an integer"),
            "{err}"
        );
    }

    #[test]
    fn parquet_with_many_row_groups() {
        let dir = tmp();
        let path = dir.path().join("big.parquet");
        let rows = search_r1_rows(3);
        let schema = infer_schema_of(&rows).unwrap();
        let mut w = RowWriter::create(&path, Some(schema))
            .unwrap()
            .with_batch_rows(1000)
            .unwrap()
            .with_row_group_rows(5000);
        let mut row = rows[0].clone();
        for i in 0..20_000i64 {
            row["extra_info"]["split_index"] = json!(i);
            w.write(&row).unwrap();
        }
        assert_eq!(w.finish().unwrap(), 20_000);

        let file = File::open(&path).unwrap();
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        let meta = builder.metadata();
        assert_eq!(meta.num_row_groups(), 4);
        assert_eq!(meta.file_metadata().num_rows(), 20_000);

        let mut r = RowReader::open(&path).unwrap();
        let mut n = 0;
        let mut last = 0;
        while let Some(x) = r.next_row() {
            let (no, v) = x.unwrap();
            n += 1;
            assert_eq!(no, n);
            assert_eq!(v["extra_info"]["split_index"], json!(n - 1));
            last = r.bytes_read();
            assert!(last <= r.len());
        }
        assert_eq!(n, 20_000);
        assert_eq!(last, r.len());
    }
}
