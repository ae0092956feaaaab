//! Completed replies, appended one line at a time to a JSONL file per stage
//! in the kind's cache directory, and read back from every such file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::Reply;

/// Replies by key.
pub struct Journal {
    done: Mutex<HashMap<String, Reply>>,
    file: Mutex<File>,
}

#[derive(Serialize, Deserialize)]
struct Line {
    key: String,
    reply: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    completion_tokens: Option<u64>,
}

impl Journal {
    /// Loads every journal in `dir` and opens `<stage>.jsonl` there for appending.
    pub fn open(dir: &Path, stage: &str) -> anyhow::Result<Journal> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut done = HashMap::new();
        for e in std::fs::read_dir(dir)?.filter_map(Result::ok) {
            if e.path().extension().is_none_or(|x| x != "jsonl") {
                continue;
            }
            let f = BufReader::new(File::open(e.path())?);
            for line in f.lines() {
                // A line cut short by a kill is ignored; its item is simply generated again.
                if let Ok(l) = serde_json::from_str::<Line>(&line?) {
                    done.insert(
                        l.key,
                        Reply {
                            text: l.reply,
                            completion_tokens: l.completion_tokens,
                        },
                    );
                }
            }
        }
        let safe: String = stage
            .chars()
            .map(|c| {
                if c.is_alphanumeric() || "-_.@=,".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = dir.join(format!("{safe}.jsonl"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening the journal {}", path.display()))?;
        Ok(Journal {
            done: Mutex::new(done),
            file: Mutex::new(file),
        })
    }

    /// The recorded reply of `key`.
    pub fn get(&self, key: &str) -> Option<Reply> {
        self.done.lock().ok()?.get(key).cloned()
    }

    /// Appends one reply in a single write, so a kill loses at most the items in flight.
    pub fn record(&self, key: &str, reply: &Reply) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(&Line {
            key: key.to_owned(),
            reply: reply.text.clone(),
            completion_tokens: reply.completion_tokens,
        })?;
        line.push(b'\n');
        let mut f = self
            .file
            .lock()
            .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
        f.write_all(&line).context("writing the journal")?;
        drop(f);
        if let Ok(mut done) = self.done.lock() {
            done.insert(key.to_owned(), reply.clone());
        }
        Ok(())
    }
}
