//! Garbage collection of records and objects.

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use serde::Serialize;

use crate::digest::{Digest, EntryKind};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{remove_path, tree_size};
use crate::record::Record;
use crate::store::Store;

/// What [`Store::gc`] removed (or, in a dry run, would remove) and kept.
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    /// Records removed: not kept by the caller, corrupt, or referring to missing objects.
    pub records_removed: usize,
    /// Objects no kept record reaches (plus stray files under `objects/`).
    pub objects_removed: usize,
    /// Bytes of removed records, objects, and `tmp/` and `staging/` leftovers. Hard
    /// links materialized elsewhere may keep some of these bytes in use.
    pub bytes_freed: u64,
    /// Records kept.
    pub records_kept: usize,
    /// Objects kept.
    pub objects_kept: usize,
}

impl Store {
    /// Remove records for which `keep(record)` is false, then every object not
    /// reachable from a kept record (a directory output reaches its manifest object
    /// and every file in it), and everything left in `tmp/` and `staging/`.
    ///
    /// Corrupt records, and records whose outputs can no longer be materialized
    /// because an object is missing or a manifest is corrupt, are removed too (with
    /// a warning). With `dry_run`, nothing is deleted and the report says what
    /// would be. Call it while holding the [`crate::WorkspaceLock`]: a concurrent
    /// run's freshly committed objects are not yet reachable from any record.
    pub fn gc(&self, keep: impl Fn(&Record) -> bool, dry_run: bool) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut reachable: HashSet<Digest> = HashSet::new();
        let remove = |path: &Path, report: &mut GcReport| -> Result<()> {
            report.bytes_freed += tree_size(path);
            if dry_run { Ok(()) } else { remove_path(path) }
        };

        for (path, parsed) in self.record_files()? {
            let record = match parsed {
                Ok(r) => r,
                Err(e @ Error::Corrupt { .. }) => {
                    tracing::warn!("removing {e}");
                    report.records_removed += 1;
                    remove(&path, &mut report)?;
                    continue;
                }
                // An unreadable record might reference anything: stop rather than guess.
                Err(e) => return Err(e),
            };
            if !keep(&record) {
                report.records_removed += 1;
                remove(&path, &mut report)?;
                continue;
            }
            match self.reachable_from(&record) {
                Ok(digests) => {
                    report.records_kept += 1;
                    reachable.extend(digests);
                }
                Err(why) => {
                    tracing::warn!("{}: removing record: {why}", path.display());
                    report.records_removed += 1;
                    remove(&path, &mut report)?;
                }
            }
        }

        let objects = self.root().join("objects");
        for shard in fs::read_dir(&objects).at(&objects)? {
            let shard = shard.at(&objects)?;
            let shard_path = shard.path();
            let shard_name = shard.file_name().into_string().unwrap_or_default();
            if !shard.file_type().at(&shard_path)?.is_dir() {
                report.objects_removed += 1;
                remove(&shard_path, &mut report)?;
                continue;
            }
            for obj in fs::read_dir(&shard_path).at(&shard_path)? {
                let obj = obj.at(&shard_path)?;
                let name = obj.file_name().into_string().unwrap_or_default();
                let digest = Digest::from_hex(&format!("{shard_name}{name}"))
                    .filter(|d| d.to_hex()[..2] == shard_name);
                if digest.is_some_and(|d| reachable.contains(&d)) {
                    report.objects_kept += 1;
                } else {
                    report.objects_removed += 1;
                    remove(&obj.path(), &mut report)?;
                }
            }
            if !dry_run {
                // Only succeeds when the shard is now empty.
                let _ = fs::remove_dir(&shard_path);
            }
        }

        for leftovers in ["tmp", "staging"] {
            let dir = self.root().join(leftovers);
            let entries = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(dir, e)),
            };
            for entry in entries {
                remove(&entry.at(&dir)?.path(), &mut report)?;
            }
        }
        Ok(report)
    }

    /// Whether every object the record's outputs need is in the store, or
    /// why not (so its outputs can be restored without running the stage).
    /// Objects are only stat'ed: a missing one, or one whose size is not the
    /// recorded size (edited in place, e.g. through a hard-linked output), fails.
    pub fn restorable(&self, record: &Record) -> std::result::Result<(), String> {
        self.objects_of(record, true).map(|_| ())
    }

    /// Every object a record's outputs need, or why they cannot all be had.
    fn reachable_from(&self, record: &Record) -> std::result::Result<Vec<Digest>, String> {
        self.objects_of(record, false)
    }

    /// The objects of a record's outputs (manifests and their files), each
    /// checked to exist and, with `sizes`, to have its recorded size.
    fn objects_of(&self, record: &Record, sizes: bool) -> std::result::Result<Vec<Digest>, String> {
        let mut out = Vec::new();
        for (name, o) in &record.outputs {
            let d = o.output.digest;
            let is_dir = o.output.kind == EntryKind::Dir;
            let size = (sizes && !is_dir).then_some(o.output.size);
            self.stat_object(&d, size, &format!("output {name:?}"))?;
            out.push(d);
            if is_dir {
                let manifest = self.manifest(&d).map_err(|e| e.to_string())?;
                for e in manifest.entries {
                    let size = sizes.then_some(e.size);
                    self.stat_object(&e.digest, size, &format!("{name}/{}", e.path))?;
                    out.push(e.digest);
                }
            }
        }
        Ok(out)
    }

    fn stat_object(
        &self,
        d: &Digest,
        size: Option<u64>,
        what: &str,
    ) -> std::result::Result<(), String> {
        match std::fs::metadata(self.object_path(d)) {
            Ok(m) if m.is_file() => match size {
                Some(s) if s != m.len() => Err(format!(
                    "object {} of {what} was changed in place ({} bytes, not {s})",
                    d.short(),
                    m.len()
                )),
                _ => Ok(()),
            },
            _ => Err(format!("object {} of {what} is missing", d.short())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::record;
    use crate::store::{LinkMode, OutputRef};
    use std::path::PathBuf;

    fn all_files(root: &Path) -> Vec<PathBuf> {
        let mut v: Vec<_> = walkdir::WalkDir::new(root)
            .into_iter()
            .map(|e| e.unwrap().path().to_path_buf())
            .collect();
        v.sort();
        v
    }

    /// A store with a kept dir output, a dropped file output sharing one file's
    /// content with the dir, a dropped unique file, a corrupt record and leftovers.
    fn populated() -> (tempfile::TempDir, Store, OutputRef, Vec<Digest>) {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join(".anneal")).unwrap();
        let staging = store.fresh_staging_dir("s").unwrap();
        fs::create_dir(staging.join("model")).unwrap();
        fs::write(staging.join("model/a"), "shared").unwrap();
        fs::write(staging.join("model/b"), "only-in-dir").unwrap();
        let model = store.commit(&staging.join("model")).unwrap();
        fs::write(staging.join("f1"), "shared").unwrap();
        let shared = store.commit(&staging.join("f1")).unwrap();
        fs::write(staging.join("f2"), "unique-garbage").unwrap();
        let garbage = store.commit(&staging.join("f2")).unwrap();
        store
            .write_record(&record("keep", &[("model", model.clone())]))
            .unwrap();
        store
            .write_record(&record("drop", &[("f1", shared), ("f2", garbage.clone())]))
            .unwrap();
        fs::write(store.root().join("records/broken.json"), "{").unwrap();
        fs::write(store.root().join("tmp/partial"), "xx").unwrap();
        fs::write(staging.join("leftover"), "yyy").unwrap();
        let removed = vec![garbage.digest];
        (tmp, store, model, removed)
    }

    #[test]
    fn removes_unreachable_and_keeps_reachable() {
        let (tmp, store, model, removed) = populated();
        let report = store.gc(|r| r.key == "keep", false).unwrap();
        assert_eq!(report.records_kept, 1);
        assert_eq!(report.records_removed, 2);
        // Kept: the manifest and both files ("shared" is also f1's content).
        assert_eq!(report.objects_kept, 3);
        assert_eq!(report.objects_removed, 1);
        assert!(report.bytes_freed >= 14 + 2 + 3);
        for d in removed {
            assert!(!store.has_object(&d));
        }
        assert!(store.read_record("drop").unwrap().is_none());
        assert!(!store.root().join("records/broken.json").exists());
        assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
        assert_eq!(
            fs::read_dir(store.root().join("staging")).unwrap().count(),
            0
        );
        let dest = tmp.path().join("model");
        store.materialize(&model, &dest, LinkMode::Copy).unwrap();
        assert_eq!(fs::read_to_string(dest.join("a")).unwrap(), "shared");

        // Running again finds nothing more to do.
        let again = store.gc(|_| true, false).unwrap();
        assert_eq!(
            (
                again.records_removed,
                again.objects_removed,
                again.bytes_freed
            ),
            (0, 0, 0)
        );
        assert_eq!(again.objects_kept, 3);
    }

    #[test]
    fn dry_run_deletes_nothing() {
        let (_tmp, store, _model, _removed) = populated();
        let before = all_files(store.root());
        let dry = store.gc(|r| r.key == "keep", true).unwrap();
        assert_eq!(all_files(store.root()), before);
        let real = store.gc(|r| r.key == "keep", false).unwrap();
        assert_eq!(
            serde_json::to_value(&dry).unwrap(),
            serde_json::to_value(&real).unwrap()
        );
    }

    #[test]
    fn records_with_missing_objects_are_removed() {
        let (_tmp, store, model, _removed) = populated();
        let m = store.manifest(&model.digest).unwrap();
        assert_eq!(m.entries[1].path, "b"); // Not shared with the "drop" record.
        fs::remove_file(store.object_path(&m.entries[1].digest)).unwrap();
        let report = store.gc(|_| true, false).unwrap();
        assert!(store.read_record("keep").unwrap().is_none());
        assert_eq!(report.records_kept, 1); // "drop" is intact and kept.
        assert!(!store.has_object(&model.digest));
    }
}
